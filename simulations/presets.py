"""Presets: readable TOML files under ``simulations/presets/`` that fix a benchmark setting.

A preset has a ``[base]`` table (run keys shared by every algorithm), one ``[algorithms.NAME]`` table per
algorithm it compares (that algorithm's hyperparameters and local settings, named as in the paper that
introduced it), and optionally ``[centralized]`` (overrides for the pooled-data upper bound).  Keys are the
flat kebab-case keys of :mod:`fedbayes.config`; every table is validated when the preset is loaded, so a typo
fails before any training starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbayes.algorithms import REGISTRY
from fedbayes.config import ConfigError, Experiment, RunConfig, resolve

__all__ = ["PRESET_DIR", "Preset", "centralized_config", "load_preset", "preset_names"]

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base: dict[str, Any]
    algorithms: dict[str, dict[str, Any]]
    centralized: dict[str, Any] = field(default_factory=dict)

    def config_for(self, algorithm: str, sets: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flat config of one algorithm: base ← algorithm table ← ``sets``."""
        if algorithm not in REGISTRY:
            raise ConfigError(f"unknown algorithm '{algorithm}'; valid: {list(REGISTRY)}")
        cfg = {**self.base, **self.algorithms.get(algorithm, {}), **(sets or {})}
        cfg["algorithm"] = algorithm
        return cfg


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> Preset:
    """Load and validate a preset by name (or a path to a TOML file)."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.toml"
    if not p.exists():
        raise ConfigError(f"unknown preset '{name_or_path}'; valid: {preset_names()}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {p}: {e}") from None
    allowed = {"description", "base", "algorithms", "centralized"}
    bad = sorted(set(data) - allowed)
    if bad:
        raise ConfigError(f"preset {p.name}: unknown table(s) {bad}; valid: {sorted(allowed)}")
    preset = Preset(
        name=p.stem,
        description=str(data.get("description", "")),
        base=dict(data.get("base", {})),
        algorithms={k: dict(v) for k, v in data.get("algorithms", {}).items()},
        centralized=dict(data.get("centralized", {})),
    )
    for algo in preset.algorithms:
        try:
            resolve(preset.config_for(algo))
        except ConfigError as e:
            raise ConfigError(f"preset {p.name} [algorithms.{algo}]: {e}") from None
    resolve(centralized_config(preset, 0))
    return preset


def centralized_config(preset: Preset, seed: int, sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pooled-data upper bound: the same model and optimiser (FedAvg's local settings) on one client that
    holds exactly the federation's examples (the union of the preset's partition, ``pool-clients``), for the
    same number of rounds × local epochs.  For ``iid`` and ``dirichlet``, which use every example, that is the
    whole (``train-fraction``) training set; for ``shards`` and ``paper`` only the examples the clients hold."""
    cfg = {**preset.base, **preset.algorithms.get("fedavg", {}), **(sets or {})}
    clients = int(cfg.get("num-clients", RunConfig.model_fields["num_clients"].default))
    cfg.pop("exclude-clients", None)
    cfg.update({"algorithm": "fedavg", "num-clients": 1, "pool-clients": clients, "clients-per-round": 1.0})
    cfg.update(preset.centralized)
    cfg["seed"] = seed
    return cfg


def check(exp_cfgs: list[dict[str, Any]]) -> list[Experiment]:
    return [resolve(c) for c in exp_cfgs]
