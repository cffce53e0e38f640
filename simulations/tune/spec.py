"""What a study is: its preset, algorithm, search space, objective and trial configuration (:class:`TuneSpec`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbayes.algorithms import REGISTRY
from fedbayes.algorithms.space import Dim, describe_space
from fedbayes.config import ConfigError, resolve
from fedbayes.keys import kebab_keys
from fedbayes.presets import load_preset

if TYPE_CHECKING:
    pass


DEFAULT_VALIDATION_FRACTION = 0.1
"""``validation-fraction`` of the trials when neither the preset nor ``--set`` gives one."""
LAST_ROUNDS = 3
"""The objective averages the validation metric over this many last evaluated rounds (as ``compare`` does)."""
OBJECTIVES: dict[str, tuple[str, str]] = {"nll": ("minimize", "nll"), "accuracy": ("maximize", "accuracy")}
"""``--objective`` -> (direction, metric name)."""
PRUNERS = ("median", "hyperband", "halving", "none")
"""``--pruner`` choices (:func:`simulations.tune.study.make_pruner`): Optuna's MedianPruner (``fedbayes tune``'s
default), HyperbandPruner and SuccessiveHalvingPruner (multi-fidelity over rounds; ``compare --tune`` defaults to
Hyperband, see docs/tuning.md), or no pruning."""
IDENTITY_KEYS = ("preset", "algorithm", "rounds", "objective", "predictor", "pruner", "search-space", "trial-config")
"""What a study remembers (user attributes) and refuses to mix."""
IDENTITY_DEFAULTS = {"pruner": "median"}
"""The value of an identity key a study made before the key existed holds (studies without a ``pruner`` attribute
were pruned by the median rule)."""
_IGNORED_IN_IDENTITY = ("device", "store", "store-cache-mb")
"""Run keys that do not change a trial's result (they may differ between machines sharing a study)."""


# ------------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class TuneSpec:
    """A validated ``fedbayes tune`` command: everything a worker needs (picklable).

    Attributes
    ----------
    preset
        The preset's name.
    algorithm
        The tuned algorithm.
    trials
        N, the finished (complete or pruned) trials the study should hold.
    rounds
        Rounds per trial.
    objective, predictor
        ``"nll"`` or ``"accuracy"``; ``"mean"`` (the global mean's prediction) or ``"bma"`` (the posterior
        average, Bayesian rules only).
    seed
        Seed of the TPE sampler (the runs use the preset's ``seed``).
    out
        The study folder.
    storage
        The Optuna storage URL.
    own_storage
        Whether the storage is the folder's own SQLite file (then RUNNING trials are failed on resume).
    base
        The flat config of a trial before the sampled values.
    space
        The search space: the algorithm's, with the preset's ``[search-space.A]`` edges (keys fixed by ``--set``
        removed).
    table
        The preset's ``[algorithms.A]`` table with the ``--set`` keys fixed from the space.
    sets
        The ``--set`` overrides (for best.toml's header).
    pruner
        One of :data:`PRUNERS`: which trials stop early, judged on the objective's metric per round.
    """

    preset: str
    algorithm: str
    trials: int
    rounds: int
    objective: str
    predictor: str
    seed: int
    out: Path
    storage: str
    own_storage: bool
    base: dict[str, Any]
    space: dict[str, Dim]
    table: dict[str, Any]
    sets: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1
    quiet: bool = False
    pruner: str = "median"

    @property
    def study_name(self) -> str:
        return f"{self.preset}.{self.algorithm}"

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def metric(self) -> str:
        """The metrics.jsonl key the objective reads, e.g. ``val_nll`` or ``bma_val_accuracy``."""
        return ("bma_" if self.predictor == "bma" else "") + "val_" + OBJECTIVES[self.objective][1]

    def identity(self) -> dict[str, Any]:
        """The user attributes that must match for a study to be continued."""
        trial_cfg = {k: v for k, v in resolve(self.base).to_flat().items()
                     if k not in self.space and k not in _IGNORED_IN_IDENTITY}
        return {
            "preset": self.preset, "algorithm": self.algorithm, "rounds": self.rounds, "objective": self.objective,
            "predictor": self.predictor, "pruner": self.pruner, "search-space": describe_space(self.space),
            "trial-config": trial_cfg,
        }



def make_spec(
    preset: str,
    algorithm: str,
    trials: int,
    *,
    rounds: int | None = None,
    jobs: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    storage: str | None = None,
    sets: Mapping[str, Any] | None = None,
    objective: str = "nll",
    predictor: str = "mean",
    quiet: bool = False,
    pruner: str = "median",
) -> TuneSpec:
    """Validate a tune command (every check happens here, before anything is written).

    Raises
    ------
    ConfigError
        Unknown preset or algorithm, an algorithm without a search space, a bad ``--set``, ``--trials``,
        ``--jobs``, ``--objective``, ``--predictor`` or ``--pruner``, or a search space whose edges the config
        rejects.
    """
    p = load_preset(preset)
    if algorithm not in REGISTRY:
        raise ConfigError(f"unknown algorithm '{algorithm}'; valid: {list(REGISTRY)}")
    cls = REGISTRY[algorithm]
    tunable = [n for n, c in REGISTRY.items() if c.search_space]
    if not cls.search_space:
        raise ConfigError(f"algorithm '{algorithm}' declares no search space (search_space in its module); "
                          f"tunable: {tunable}")
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}'; valid: {sorted(OBJECTIVES)}")
    if pruner not in PRUNERS:
        raise ConfigError(f"unknown pruner '{pruner}'; valid: {list(PRUNERS)}")
    if predictor not in ("mean", "bma"):
        raise ConfigError(f"unknown predictor '{predictor}'; valid: ['bma', 'mean']")
    if predictor == "bma" and not cls.bayesian:
        raise ConfigError(f"--predictor bma needs a Bayesian algorithm; '{algorithm}' has no posterior")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    user = kebab_keys(sets or {})
    base = kebab_keys(p.config_for(algorithm))
    base.update(user)
    if rounds is not None:
        base["rounds"] = rounds
    base.setdefault("validation-fraction", DEFAULT_VALIDATION_FRACTION)
    base["eval-split"] = "validation"
    for key, every_round in (("eval-every", 1), ("eval-last", 0)):  # the pruner judges every round on the (small)
        if key not in user:                                       # validation set; a preset's sparse test-set
            base[key] = every_round                               # evaluation is for its final runs

    try:
        exp = resolve(base)
    except ConfigError as e:
        raise ConfigError(f"tune {algorithm} on preset {p.name}: {e}") from None
    if predictor == "bma" and exp.run.bma_samples == 0:
        raise ConfigError("--predictor bma needs bma-samples > 0")
    full = {**cls.search_space, **p.search_space.get(algorithm, {})}  # the preset may move edges
    space = {k: d for k, d in full.items() if k not in user}
    if not space:
        raise ConfigError(f"--set fixes every key of {algorithm}'s search space {sorted(full)}: "
                          "nothing left to tune")
    for key, dim in space.items():  # the config must accept the space's edges
        for v in dim.bounds():
            try:
                resolve({**base, key: v})
            except ConfigError as e:
                raise ConfigError(f"search space of {algorithm}: {key} = {v!r} is rejected: {e}") from None
    table = kebab_keys(p.algorithms.get(algorithm, {}))
    table.update({k: v for k, v in user.items() if k in full})
    folder = Path(out) if out is not None else Path("runs") / "tune" / p.name / algorithm
    own = storage is None
    url = storage if storage is not None else f"sqlite:///{(folder / 'study.db').resolve()}"
    return TuneSpec(
        preset=p.name, algorithm=algorithm, trials=int(trials), rounds=exp.run.rounds, objective=objective,
        predictor=predictor, seed=int(seed), out=folder, storage=url, own_storage=own, base=base, space=space,
        table=table, sets={k: v for k, v in user.items()}, jobs=int(jobs), quiet=quiet, pruner=pruner,
    )
