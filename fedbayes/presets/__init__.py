"""Presets: readable TOML files beside this module (``fedbayes/presets/``) that fix a benchmark setting.

A preset has a ``[base]`` table (run keys shared by every algorithm), one ``[algorithms.NAME]`` table per
algorithm it compares (that algorithm's hyperparameters and local settings, named as in the paper that
introduced it), and optionally ``[centralized]`` (overrides for the pooled-data upper bound) and
``centralized-rows`` (which pooled-data rows ``fedbayes compare`` adds: ``centralized``, ``centralized-ivon``;
default both).  A preset may
start from another one with ``extends = "NAME"`` (its tables are copied, then this file's keys override them
key by key): a harder split that must use a tuned preset's values *unchanged* says so this way; ``include =
[...]`` restricts (and orders) the algorithms it compares; ``[search-space.NAME]`` moves the edges of that
algorithm's tuning ranges (``lr = [2e-3, 3e-2]``; :meth:`fedbayes.algorithms.space.Dim.rebound`) for a model the
built-in ranges were not made for.  Keys are the
flat kebab-case keys of :mod:`fedbayes.config`; every table is validated when the preset is loaded, so a typo
fails before any training starts.

A run that names no preset starts from its dataset's default preset (:data:`DATASET_PRESETS`,
:func:`apply_preset`), under the keys it sets itself: ``fedbayes run`` and Flower's run config
(``preset = "auto"``, :mod:`fedbayes.runconfig`) resolve a run the same way.

Importing this module imports no torch: the ``fedbayes`` parser reads :data:`DATASET_PRESETS` and
:func:`preset_names` for its help, and ``fedbayes --help`` must stay fast (``tests/test_cli_ux.py``); the
configuration (:mod:`fedbayes.config`, which imports the algorithms) is imported by the functions that validate.
``fedbayes presets`` lists every preset with :func:`preset_summaries`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbayes.keys import kebab, kebab_keys
from fedbayes.names import unknown

__all__ = [
    "AUTO",
    "DATASET_PRESETS",
    "PRESET_DIR",
    "Preset",
    "apply_preset",
    "centralized_config",
    "centralized_ivon_config",
    "load_preset",
    "preset_names",
    "preset_summaries",
]

PRESET_DIR = Path(__file__).parent

DATASET_PRESETS: dict[str, str] = {
    "digits": "digits-10-het",
    "fmnist": "fmnist-10-het",
    "mnist": "mnist-100-2class",
    "adult": "adult-10-het",
}
"""Each dataset's default preset: what ``fedbayes run`` without ``--preset`` (and Flower's run config with
``preset = "auto"``) starts from, so that a bare ``--algorithm A --dataset D`` run uses settings that learn.
Datasets not listed (breast-cancer, the synthetic ones) keep the code's defaults."""

AUTO = "auto"
"""``preset`` value meaning "the run's dataset's default preset" (:data:`DATASET_PRESETS`)."""

CENTRALIZED_ROWS: tuple[str, ...] = ("centralized", "centralized-ivon")
"""The pooled-data rows ``fedbayes compare`` can add: Adam with FedAvg's settings, IVON with the Bayesian rules'."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base: dict[str, Any]
    algorithms: dict[str, dict[str, Any]]
    centralized: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``[search-space.A]``: per algorithm, the tuner's dimensions this preset moves (key -> :class:`Dim`)."""
    centralized_rows: tuple[str, ...] = CENTRALIZED_ROWS
    """``centralized-rows``: which pooled-data rows ``fedbayes compare`` adds (default both; ``--no-centralized``
    drops them all)."""

    def config_for(self, algorithm: str, sets: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flat config of one algorithm: base ← algorithm table ← ``sets``.  A key of ``sets`` replaces the
        preset's alternatives to it (the algorithm config's ``alternative_keys``, e.g. ``rho`` its ``rho-k``),
        so the user's value wins instead of clashing."""
        from fedbayes.algorithms import REGISTRY
        from fedbayes.config import ConfigError

        if algorithm not in REGISTRY:
            raise ConfigError(unknown("algorithm", algorithm, REGISTRY))
        sets = kebab_keys(sets)
        table = {**self.base, **self.algorithms.get(algorithm, {})}
        for keys in REGISTRY[algorithm].Config.alternative_keys:
            if any(k in sets for k in keys):
                for k in keys:
                    table.pop(k, None)
        cfg = {**table, **sets}
        cfg["algorithm"] = algorithm
        return cfg


_loading: set[str] = set()  # presets being loaded through 'extends' (cycle detection)


def preset_names() -> list[str]:
    """The built-in presets' names (the TOML files of :data:`PRESET_DIR`), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def unknown_preset(name: str) -> str:
    """The error for a preset that is neither a built-in name nor an existing file: the closest names."""
    return unknown("preset", name, preset_names()) + " (or a path to a .toml file; `fedbayes presets` lists them)"


def preset_summaries() -> list[dict[str, str]]:
    """One entry per built-in preset: ``name``, ``dataset``, ``algorithms`` (comma-separated), ``rounds`` and
    ``description``, from the loaded (validated) preset: ``extends`` is followed."""
    from fedbayes.config import RunConfig

    out = []
    for name in preset_names():
        p = load_preset(name)
        out.append({
            "name": name,
            "dataset": str(p.base.get("dataset", RunConfig.model_fields["dataset"].default)),
            "algorithms": ",".join(p.algorithms),
            "rounds": str(p.base.get("rounds", RunConfig.model_fields["rounds"].default)),
            "description": " ".join(p.description.split()),
        })
    return out


def load_preset(name_or_path: str) -> Preset:
    """Load and validate a preset by name (or a path to a TOML file)."""
    from fedbayes.config import ConfigError, resolve

    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.toml"
    if not p.exists():
        raise ConfigError(unknown_preset(name_or_path))
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {p}: {e}") from None
    allowed = {"description", "extends", "include", "base", "algorithms", "centralized", "centralized-rows",
               "search-space"}
    bad = sorted(set(data) - allowed)
    if bad:
        raise ConfigError(f"preset {p.name}: unknown table(s) {bad}; valid: {sorted(allowed)}")
    base: dict[str, Any] = {}
    algorithms: dict[str, dict[str, Any]] = {}
    centralized: dict[str, Any] = {}
    search_space: dict[str, dict[str, Any]] = {}
    centralized_rows = CENTRALIZED_ROWS
    if "extends" in data:  # start from another preset (e.g. its tuned values, unchanged), then override
        parent_name = str(data["extends"])
        if parent_name in _loading:
            raise ConfigError(f"preset {p.name}: 'extends' cycle through '{parent_name}'")
        _loading.add(parent_name)
        try:
            parent = load_preset(parent_name)
        finally:
            _loading.discard(parent_name)
        base, centralized = dict(parent.base), dict(parent.centralized)
        algorithms = {k: dict(v) for k, v in parent.algorithms.items()}
        search_space = {k: dict(v) for k, v in parent.search_space.items()}
        centralized_rows = parent.centralized_rows
    if "centralized-rows" in data:  # e.g. the demo keeps only the Adam row
        rows = data["centralized-rows"]
        if not isinstance(rows, list) or not set(map(str, rows)) <= set(CENTRALIZED_ROWS) or len(set(rows)) < len(rows):
            raise ConfigError(f"preset {p.name}: centralized-rows must be a list of distinct names from "
                              f"{list(CENTRALIZED_ROWS)} (empty: none), got {rows!r}")
        centralized_rows = tuple(r for r in CENTRALIZED_ROWS if r in rows)
    base.update(data.get("base", {}))
    for k, v in data.get("algorithms", {}).items():
        algorithms.setdefault(k, {}).update(v)
    centralized.update(data.get("centralized", {}))
    for algo, dims in _search_space_tables(p.name, data.get("search-space", {})).items():
        search_space.setdefault(algo, {}).update(dims)
    if "include" in data:  # compare only these algorithms (e.g. of an extended preset), in this order
        include = [str(a) for a in data["include"]]
        missing = [a for a in include if a not in algorithms]
        if missing:
            raise ConfigError(f"preset {p.name}: 'include' names {missing}, which have no [algorithms.*] table; "
                              f"valid: {sorted(algorithms)}")
        algorithms = {a: algorithms[a] for a in include}
    preset = Preset(
        name=p.stem,
        description=str(data.get("description", "")),
        base=base,
        algorithms=algorithms,
        centralized=centralized,
        search_space=search_space,
        centralized_rows=centralized_rows,
    )
    for algo in preset.algorithms:
        try:
            resolve(preset.config_for(algo))
        except ConfigError as e:
            raise ConfigError(f"preset {p.name} [algorithms.{algo}]: {e}") from None
    resolve(centralized_config(preset, 0))
    resolve(centralized_ivon_config(preset, 0))
    return preset


def _search_space_tables(preset: str, tables: Any) -> dict[str, dict[str, Any]]:
    """Validate ``[search-space.A]`` tables: A a registered algorithm, each key one of A's search-space keys,
    each value new edges for that dimension (:meth:`fedbayes.algorithms.space.Dim.rebound`)."""
    from fedbayes.algorithms import REGISTRY
    from fedbayes.config import ConfigError

    if not isinstance(tables, dict):
        raise ConfigError(f"preset {preset}: [search-space] must hold one table per algorithm, "
                          "e.g. [search-space.bayes-admm] lr = [2e-3, 3e-2]")
    out: dict[str, dict[str, Any]] = {}
    for algo, dims in tables.items():
        if algo not in REGISTRY:
            raise ConfigError(f"preset {preset} [search-space.{algo}]: " + unknown("algorithm", algo, REGISTRY))
        space = REGISTRY[algo].search_space
        if not isinstance(dims, dict):
            raise ConfigError(f"preset {preset} [search-space.{algo}]: must be a table of key = [low, high]")
        for key, value in kebab_keys(dims).items():
            if key not in space:
                raise ConfigError(f"preset {preset} [search-space.{algo}]: '{key}' is not in {algo}'s search "
                                  f"space; valid: {sorted(space)}")
            try:
                out.setdefault(algo, {})[key] = space[key].rebound(value)
            except ValueError as e:
                raise ConfigError(f"preset {preset} [search-space.{algo}] {key}: {e}") from None
    return out


def apply_preset(explicit: Mapping[str, Any], preset: str | None = AUTO) -> tuple[dict[str, Any], str | None]:
    """A run's flat config: ``preset``'s config for the run's algorithm, with the explicit keys on top.

    Parameters
    ----------
    explicit
        The keys the user gave (command-line options, ``--set``, Flower's non-empty run-config keys); they win.
    preset
        ``"auto"``: the default preset of the run's dataset (``explicit["dataset"]``, else fedbayes' default
        dataset) from :data:`DATASET_PRESETS`, none if it has no default; a preset name or TOML path; ``None``,
        ``""`` or ``"none"``: no preset (the code's defaults).

    Returns
    -------
    tuple
        The flat kebab-case config (preset ← explicit; the algorithm is ``explicit["algorithm"]``, else fedbayes'
        default; an explicit key replaces the preset's alternatives to it, e.g. ``rho`` its ``rho-k``: see
        :meth:`Preset.config_for`) and the name of the preset used (None: none).

    Raises
    ------
    ConfigError
        An unknown preset or algorithm.
    """
    from fedbayes.config import RunConfig

    flat = kebab_keys(explicit)
    name = (preset or "").strip()
    if name.lower() in ("", "none"):
        return flat, None
    if name == AUTO:
        dataset = str(flat.get("dataset", RunConfig.model_fields["dataset"].default))
        auto = DATASET_PRESETS.get(dataset)
        if auto is None:
            return flat, None
        name = auto
    p = load_preset(name)
    algorithm = str(flat.get("algorithm", RunConfig.model_fields["algorithm"].default))
    return p.config_for(algorithm, flat), p.name


def centralized_config(preset: Preset, seed: int, sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pooled-data upper bound: the same model and optimiser (FedAvg's local settings) on one client that
    holds exactly the federation's examples (the union of the preset's partition, ``pool-clients``), for the
    same number of rounds × local epochs.  For ``iid`` and ``dirichlet``, which use every example, that is the
    whole (``train-fraction``) training set; for ``shards`` and ``paper`` only the examples the clients hold."""
    from fedbayes.config import RunConfig

    cfg = {**preset.base, **preset.algorithms.get("fedavg", {}), **(sets or {})}
    clients = int(cfg.get("num-clients", RunConfig.model_fields["num_clients"].default))
    cfg.pop("exclude-clients", None)
    cfg.update({"algorithm": "fedavg", "num-clients": 1, "pool-clients": clients, "clients-per-round": 1.0})
    cfg.update(preset.centralized)
    cfg["seed"] = seed
    return cfg


IVON_TABLES = ("bayes-admm", "pvi")
"""Where :func:`centralized_ivon_config` takes its IVON settings from: the first of these tables the preset has."""


def centralized_ivon_config(preset: Preset, seed: int, sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pooled-data IVON row (``centralized-ivon``): the same pooled client as :func:`centralized_config`,
    trained by IVON with the local settings (and prior precision δ) of the preset's ``bayes-admm`` table (the
    tuned IVON settings), else its ``pvi`` table, as one-client PVI with ρ = 1.  With K = 1 the cavity is always
    the prior λ₀, so round r continues IVON from the previous round's posterior (warm start at its mean and
    precision) under λ₀: IVON on the pooled data for rounds × epochs, with the same lr schedule — a fair upper
    bound for the Bayesian rules, with a posterior, hence a posterior-averaged prediction too (``centralized``'s
    Adam is a point estimate whose NLL overfits).  From that table and from ``sets`` only run keys and δ
    (``prior-prec``) are kept: the rule-specific keys (ρ, damping, …) are dropped; the preset's
    ``[centralized]`` table is the Adam row's."""
    from fedbayes.config import RunConfig

    table: dict[str, Any] = {}
    for name in IVON_TABLES:
        if name in preset.algorithms:
            table = preset.algorithms[name]
            break
    keep = {kebab(k) for k in RunConfig.model_fields} | {"prior-prec"}
    cfg = {**preset.base, **{k: v for k, v in {**table, **(sets or {})}.items() if kebab(k) in keep}}
    clients = int(cfg.get("num-clients", RunConfig.model_fields["num_clients"].default))
    cfg.pop("exclude-clients", None)
    cfg.update({"algorithm": "pvi", "rho": 1.0, "mode": "ivon", "num-clients": 1, "pool-clients": clients,
                "clients-per-round": 1.0})
    cfg["seed"] = seed
    return cfg
