"""Flower's run config (``[tool.flwr.app.config]``, ``flwr run -c``) <-> fedbayes' flat experiment config.

Flower only accepts run-config values of type bool, int, float and str, and ``flwr run -c`` may only override
keys that already exist in ``pyproject.toml`` (the SuperLink rejects any other key).  So the app's run config
lists every key, laid out as:

* the run's keys at the top level, exactly as :class:`fedbayes.config.RunConfig` names them
  (``algorithm``, ``dataset``, ``num-clients``, ``rounds``, ``epochs`` …);
* each algorithm's hyperparameters in its own table, ``<algorithm>.<key>`` (``bayes-admm.rho``,
  ``fedprox.mu``); only the chosen algorithm's table is used, but every table is checked;
* a few keys that only the Flower app reads (:data:`FLOWER_KEYS`: ``preset``, ``out-dir``, ``data-dir``,
  ``node-wait-s``, ``resume-from``, ``resolved-preset``, ``verbose``); they never reach
  :func:`fedbayes.config.resolve`.  (The round deadline is
  the run key ``round-timeout``.)

The empty string means "unset" (TOML has no null).  ``preset`` says what an unset key takes, exactly as
``fedbayes run`` does without ``--preset`` (:func:`fedbayes.presets.apply_preset`): ``"auto"`` (the default)
the run's dataset's default preset (``digits`` -> ``digits-10-het``; a dataset without one: none), a preset name
that preset, ``""`` none; the preset's value for the chosen algorithm, then the algorithm's default, then
fedbayes' default.  Every key that is set wins over the preset.  So pyproject.toml leaves almost every key unset
(:func:`pyproject_run_config`): only ``algorithm``, ``num-clients`` and ``rounds`` (sized for the three-SuperNode
demo) and the Flower-only keys have values there, and a bare ``flwr run`` trains with the digits preset's
settings.  Only the ServerApp applies it: it resolves the run config once (:func:`split_run_config`) and sends
the resolved configuration in every message (:mod:`fedbayes.flower.records`), from which each ClientApp rebuilds
its data and model; a ClientApp reads no presets and of the run config only ``data-dir``.
``hidden`` and ``exclude-clients`` are comma-separated strings (``"200,100"``).  Every problem raises
:class:`fedbayes.config.ConfigError` naming the key.  This module imports neither flwr nor torch at import time.

When fedbayes gains a config key, regenerate the section with ``python -m fedbayes.runconfig`` (a test compares
pyproject.toml with :func:`pyproject_run_config`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedbayes.config import Experiment

__all__ = [
    "FLOWER_KEYS",
    "UNSET",
    "FlowerOptions",
    "app_run_config",
    "experiment_from_run_config",
    "overrides_toml",
    "pyproject_run_config",
    "run_config_overrides",
    "split_run_config",
]

UNSET = ""
"""Run-config value meaning "not set" (the default applies)."""

PRESET_AUTO = "auto"
"""``preset`` value: the run's dataset's default preset (:data:`fedbayes.presets.DATASET_PRESETS`)."""

FLOWER_KEYS: dict[str, Any] = {
    "preset": PRESET_AUTO,
    "out-dir": "runs/flower",
    "data-dir": UNSET,
    "node-wait-s": 60.0,
    "resume-from": UNSET,
    "resolved-preset": UNSET,
    "verbose": False,
}
"""Keys only the Flower app reads, with their defaults.  ``resolved-preset`` names the preset a command already
applied to the keys it sends (``fedbayes run --engine flower`` sends every key with ``preset = ""``), for the
ServerApp's first line only; ``verbose`` shows Flower's own INFO output (the app's `server/logs.py`)."""


@dataclass(frozen=True)
class FlowerOptions:
    """The Flower-only settings of a run.

    Attributes
    ----------
    out_dir
        The results folder (relative paths are relative to the ServerApp's working directory).
    data_dir
        The dataset cache root (None: fedbayes' default).
    node_wait_s
        How long the ServerApp waits, at the start, for a SuperNode per partition.
    resume_from
        A results folder whose ``checkpoint/`` the run continues (None: a fresh run in ``out_dir``).  The
        resumed run writes into that folder; ``out_dir`` is then not used.
    preset
        The run config's ``preset`` (``"auto"``, a name, or None for ``""``); after :func:`split_run_config`,
        the preset the run was resolved with (None: none).
    resolved_preset
        The preset the submitting command applied itself (``resolved-preset``; None: none or not said).
    verbose
        Show Flower's own INFO lines (``verbose``; default: only fedbayes' headline lines, the app's `server/logs.py`).
    """

    out_dir: Path
    data_dir: Path | None
    node_wait_s: float
    resume_from: Path | None = None
    preset: str | None = None
    resolved_preset: str | None = None
    verbose: bool = False

    def preset_line(self) -> str:
        """How the ServerApp's first line names the preset: ``preset digits-10-het``, ``preset digits-10-het
        (resolved by the command)`` or ``preset none``."""
        if self.preset:
            return f"preset {self.preset}"
        if self.resolved_preset:
            return f"preset {self.resolved_preset} (resolved by the command)"
        return "preset none"


def _config_error(msg: str) -> Exception:
    from fedbayes.config import ConfigError

    return ConfigError(msg)


def _number(key: str, v: Any, *, minimum: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise _config_error(f"run config '{key}' must be a number, got {v!r}")
    try:
        x = float(v)
    except ValueError:
        raise _config_error(f"run config '{key}' must be a number, got {v!r}") from None
    if not math.isfinite(x) or x < minimum:
        raise _config_error(f"run config '{key}' must be a finite number >= {minimum}, got {v!r}")
    return x


def _typed(vals: Mapping[str, Any], key: str, kind: type, what: str, nonempty: bool = False) -> Any:
    """``vals[key]`` if it is a ``kind`` (and, with ``nonempty``, not blank), else the error "must be ``what``"."""
    v = vals[key]
    if not isinstance(v, kind) or (nonempty and not str(v).strip()):
        raise _config_error(f"run config '{key}' must be {what}, got {v!r}")
    return v


def _options(cfg: Mapping[str, Any]) -> FlowerOptions:
    vals = {k: cfg.get(k, d) for k, d in FLOWER_KEYS.items()}
    out = _typed(vals, "out-dir", str, "a non-empty path string", nonempty=True)
    data = _typed(vals, "data-dir", str, "a path string ('' = default cache)")
    resume = _typed(vals, "resume-from", str, "a results folder path ('' = fresh run)")
    preset = _typed(vals, "preset", str, '"auto", a preset name or "" (none)')
    resolved = _typed(vals, "resolved-preset", str, 'a preset name or ""')
    verbose = _typed(vals, "verbose", bool, "true or false")
    return FlowerOptions(
        out_dir=Path(out).expanduser(),
        data_dir=Path(data).expanduser() if data.strip() else None,
        node_wait_s=_number("node-wait-s", vals["node-wait-s"], minimum=0.0),
        resume_from=Path(resume).expanduser() if resume.strip() else None,
        preset=preset.strip() or None,
        resolved_preset=resolved.strip() or None,
        verbose=verbose,
    )


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], FlowerOptions]:
    """Split Flower's flat run config into fedbayes' flat config and the Flower-only options.

    Parameters
    ----------
    run_config
        ``context.run_config``: flat keys, ``<algorithm>.<key>`` for algorithm hyperparameters.

    Returns
    -------
    tuple
        The flat config for :func:`fedbayes.config.resolve` (the set keys, the chosen algorithm's table
        un-prefixed, over the ``preset``'s config for that algorithm; unset keys the preset lacks are dropped)
        and the :class:`FlowerOptions` (``preset``: the preset used).

    Raises
    ------
    ConfigError
        A key that is neither a run key, a Flower-only key nor ``<algorithm>.<hyperparameter>``, a bad value, or
        an unknown preset; the message names the key.
    """
    from dataclasses import replace

    from fedbayes.algorithms import REGISTRY
    from fedbayes.config import ConfigError, RunConfig
    from fedbayes.keys import kebab
    from fedbayes.presets import apply_preset

    run_keys = {kebab(n) for n in RunConfig.model_fields}
    flat: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, value in run_config.items():
        if not isinstance(value, bool | int | float | str):
            raise _config_error(f"run config '{key}' has unsupported value {value!r} (bool, int, float or str)")
        if key in FLOWER_KEYS:
            continue
        if "." in key:
            algo, _, name = key.partition(".")
            if algo not in REGISTRY:
                unknown.append(key)
                continue
            valid = {kebab(n) for n in REGISTRY[algo].Config.model_fields}
            if name not in valid:
                raise _config_error(
                    f"unknown run config key '{key}': algorithm '{algo}' has the keys {sorted(valid)}"
                )
            tables.setdefault(algo, {})[name] = value
        elif key in run_keys:
            flat[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise _config_error(
            f"unknown run config key(s) {sorted(unknown)}. Run keys: {sorted(run_keys)}; Flower-only keys: "
            f"{sorted(FLOWER_KEYS)}; algorithm keys go in '<algorithm>.<key>' ({sorted(REGISTRY)})"
        )
    algorithm = flat.get("algorithm", RunConfig.model_fields["algorithm"].default)
    flat.update(tables.get(str(algorithm), {}))
    flat = {k: v for k, v in flat.items() if not (isinstance(v, str) and v == UNSET)}
    opts = _options(run_config)
    try:
        flat, used = apply_preset(flat, opts.preset)
    except ConfigError as e:
        raise _config_error(f"run config 'preset': {e}") from None
    return flat, replace(opts, preset=used)


def experiment_from_run_config(run_config: Mapping[str, Any]) -> tuple[Experiment, FlowerOptions]:
    """:func:`split_run_config`, then :func:`fedbayes.config.resolve` (``ConfigError`` naming the key)."""
    from fedbayes.config import resolve

    flat, opts = split_run_config(run_config)
    return resolve(flat), opts


def _toml_value(v: Any) -> bool | int | float | str:
    if v is None:
        return UNSET
    if isinstance(v, list | tuple):
        return ",".join(str(int(x)) for x in v)
    if isinstance(v, bool | int | float | str):
        return v
    raise TypeError(f"cannot express {v!r} in a Flower run config")


def run_config_overrides(flat: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``flwr run -c`` overrides (every key, namespaced) that reproduce a fedbayes flat config.

    ``flat`` is validated with :func:`fedbayes.config.resolve` first (``ConfigError`` naming a bad key);
    ``options`` are Flower-only keys (e.g. ``{"out-dir": "/abs/path"}``).  ``preset`` is ``""``: every key is
    given, and the unset local keys must stay the algorithm's defaults, as in the flat config.
    """
    from fedbayes.config import resolve

    exp = resolve(flat)
    out: dict[str, Any] = {k: _toml_value(v) for k, v in exp.run.model_dump(by_alias=True, mode="json").items()}
    algo = exp.run.algorithm
    for k, v in exp.algo.model_dump(by_alias=True, mode="json").items():
        out[f"{algo}.{k}"] = _toml_value(v)
    out["preset"] = UNSET
    for k, v in (options or {}).items():
        if k not in FLOWER_KEYS:
            raise _config_error(f"unknown Flower-only key '{k}'; valid: {sorted(FLOWER_KEYS)}")
        out[k] = _toml_value(str(v) if isinstance(v, Path) else v)
    return out


def app_run_config() -> dict[str, Any]:
    """Every key the app's ``[tool.flwr.app.config]`` must hold, with fedbayes' defaults (flat, namespaced)."""
    from fedbayes.algorithms import REGISTRY
    from fedbayes.config import RunConfig

    out: dict[str, Any] = {
        k: _toml_value(v) for k, v in RunConfig.model_validate({}).model_dump(by_alias=True, mode="json").items()
    }
    for name, cls in REGISTRY.items():
        for k, v in cls.Config().model_dump(by_alias=True, mode="json").items():
            out[f"{name}.{k}"] = _toml_value(v)
    out.update(FLOWER_KEYS)
    return out


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    return json.dumps(str(v))


def overrides_toml(overrides: Mapping[str, Any]) -> str:
    """A TOML document for ``flwr run -c FILE.toml`` (dotted keys for the algorithm tables)."""
    return "".join(f"{k} = {_toml_literal(v)}\n" for k, v in overrides.items())


DEMO_DEFAULTS: dict[str, Any] = {"num-clients": 3, "rounds": 5}
"""Where the app's pyproject defaults differ from fedbayes': sized for the three-SuperNode compose demo."""

PYPROJECT_SET = ("algorithm", *DEMO_DEFAULTS)
"""The only fedbayes keys with a value in pyproject.toml (besides the Flower-only ones); the rest are unset."""


def pyproject_run_config() -> dict[str, Any]:
    """What pyproject's ``[tool.flwr.app.config]`` holds: every key of :func:`app_run_config`, unset (``""``: the
    preset's value, else the default) except ``preset`` (``"auto"``), ``algorithm`` (fedbayes' default),
    :data:`DEMO_DEFAULTS` and the Flower-only keys.  A key with a value there would win over the preset."""
    full = app_run_config()
    out: dict[str, Any] = {"preset": FLOWER_KEYS["preset"]}
    for k, v in full.items():
        if k in FLOWER_KEYS or k == "algorithm":
            out[k] = v
        elif k in DEMO_DEFAULTS:
            out[k] = DEMO_DEFAULTS[k]
        else:
            out[k] = UNSET
    return out


def pyproject_section() -> str:
    """The ``[tool.flwr.app.config]`` section of pyproject.toml, generated from fedbayes' config models."""
    cfg = pyproject_run_config()
    top = {k: v for k, v in cfg.items() if "." not in k}
    lines = ["[tool.flwr.app.config]", *(f"{k} = {_toml_literal(v)}" for k, v in top.items())]
    tables: dict[str, list[str]] = {}
    for k, v in cfg.items():
        if "." in k:
            algo, _, name = k.partition(".")
            tables.setdefault(algo, []).append(f"{name} = {_toml_literal(v)}")
    for algo, rows in tables.items():
        lines += ["", f"[tool.flwr.app.config.{algo}]", *rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(pyproject_section(), end="")
