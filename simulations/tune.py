"""``fedbayes tune`` and ``fedbayes tune-apply``: fair hyperparameter tuning on a validation split.

``fedbayes tune --preset P --algorithm A --trials N`` runs an Optuna study (seeded TPE sampler, median pruning)
over A's search space (``search_space`` in its module, :mod:`fedbayes.algorithms.space`).  Every trial is one
in-process run (:func:`fedbayes.engine.run_experiment`, nothing written to disk) of the preset's config for A with
the sampled values, ``validation-fraction`` (0.1 unless the preset or ``--set`` gives one) and
``eval-split = "validation"`` forced: it trains on exactly the clients' data of the final runs whenever the
training file has enough unused examples (:mod:`fedbayes.data.validation`) and never sees the test set.  Each
round's validation metric is reported to Optuna, which may prune the trial; the objective is the mean of the
last 3 evaluated rounds' ``val_nll`` (minimised) or, with ``--objective accuracy``, ``val_accuracy``
(maximised).  A trial that diverges (the run raises, or a metric is NaN) is recorded as pruned, with the reason
in its ``diverged`` user attribute; the study goes on.

Storage and resuming.  The study lives in an SQLite file ``DIR/study.db`` (default ``DIR`` =
``runs/tune/P/A``) or in any Optuna RDB storage given by ``--storage URL`` (shared by several machines).  It
records its preset, algorithm, rounds, objective, predictor, search space and the rest of the trial config in
its user attributes; running the command against a study with other values stops with an error naming the key,
before anything is written.  Re-running the same command continues a killed study until N trials are finished
(complete or pruned); with the folder's own SQLite file, trials left RUNNING by a killed process are marked
FAIL first (a lock file keeps two commands off one folder); with ``--storage`` they are failed by Optuna's
heartbeat once stale.  ``--jobs J`` runs J processes (one torch thread each) that share the storage and split
the remaining trials between them.

Outputs (after every trial, and at the end): ``DIR/best.toml`` — a preset fragment ``[algorithms.A]``: the
preset's table with the best values merged in, under a comment header (study, trials, budget, objective, best
value) — and ``DIR/best.json``; at the end ``history.png`` (optimisation history), ``importance.png``
(parameter importances; needs 2 complete trials) and ``curves.png`` (validation metric per round per trial).

``fedbayes tune-apply DIR... --preset P --out NEW.toml`` merges the ``best.toml`` of one or more studies into
a copy of preset P and validates the result: tuned presets come from a command, not from hand edits.

Start point.  A fresh study's first trial is the preset's own values of the search-space keys (those inside the
space), so a re-tune starts from the previous best and every method gets the same head start.

``--set`` keys shape the trials (e.g. ``epochs=2`` as a cheaper budget) and are listed in best.toml's header;
only a ``--set`` key that is in the search space is fixed (no longer tuned) and written into the table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import re
import time
import tomllib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbayes.algorithms import REGISTRY
from fedbayes.algorithms.space import Dim, describe_space
from fedbayes.config import ConfigError, parse_sets, resolve
from fedbayes.results import atomic_write_bytes
from simulations.presets import PRESET_DIR, load_preset

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_VALIDATION_FRACTION",
    "LAST_ROUNDS",
    "OBJECTIVES",
    "TuneSpec",
    "add_subparsers",
    "apply_best",
    "make_spec",
    "toml_table",
    "tune",
]

DEFAULT_VALIDATION_FRACTION = 0.1
"""``validation-fraction`` of the trials when neither the preset nor ``--set`` gives one."""
LAST_ROUNDS = 3
"""The objective averages the validation metric over this many last evaluated rounds (as ``compare`` does)."""
OBJECTIVES: dict[str, tuple[str, str]] = {"nll": ("minimize", "nll"), "accuracy": ("maximize", "accuracy")}
"""``--objective`` -> (direction, metric name)."""
IDENTITY_KEYS = ("preset", "algorithm", "rounds", "objective", "predictor", "search-space", "trial-config")
"""What a study remembers (user attributes) and refuses to mix."""
_IGNORED_IN_IDENTITY = ("device", "store")
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
        The search space (keys fixed by ``--set`` removed).
    table
        The preset's ``[algorithms.A]`` table with the ``--set`` keys fixed from the space.
    sets
        The ``--set`` overrides (for best.toml's header).
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
            "predictor": self.predictor, "search-space": describe_space(self.space), "trial-config": trial_cfg,
        }


def _kebab_keys(d: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).replace("_", "-"): v for k, v in d.items()}


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
) -> TuneSpec:
    """Validate a tune command (every check happens here, before anything is written).

    Raises
    ------
    ConfigError
        Unknown preset or algorithm, an algorithm without a search space, a bad ``--set``, ``--trials``,
        ``--jobs``, ``--objective`` or ``--predictor``, or a search space whose edges the config rejects.
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
    if predictor not in ("mean", "bma"):
        raise ConfigError(f"unknown predictor '{predictor}'; valid: ['bma', 'mean']")
    if predictor == "bma" and not cls.bayesian:
        raise ConfigError(f"--predictor bma needs a Bayesian algorithm; '{algorithm}' has no posterior")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    user = _kebab_keys(sets or {})
    base = _kebab_keys(p.config_for(algorithm))
    base.update(user)
    if rounds is not None:
        base["rounds"] = rounds
    base.setdefault("validation-fraction", DEFAULT_VALIDATION_FRACTION)
    base["eval-split"] = "validation"
    try:
        exp = resolve(base)
    except ConfigError as e:
        raise ConfigError(f"tune {algorithm} on preset {p.name}: {e}") from None
    if predictor == "bma" and exp.run.bma_samples == 0:
        raise ConfigError("--predictor bma needs bma-samples > 0")
    space = {k: d for k, d in cls.search_space.items() if k not in user}
    if not space:
        raise ConfigError(f"--set fixes every key of {algorithm}'s search space {sorted(cls.search_space)}: "
                          "nothing left to tune")
    for key, dim in space.items():  # the config must accept the space's edges
        for v in dim.bounds():
            try:
                resolve({**base, key: v})
            except ConfigError as e:
                raise ConfigError(f"search space of {algorithm}: {key} = {v!r} is rejected: {e}") from None
    table = _kebab_keys(p.algorithms.get(algorithm, {}))
    table.update({k: v for k, v in user.items() if k in cls.search_space})
    folder = Path(out) if out is not None else Path("runs") / "tune" / p.name / algorithm
    own = storage is None
    url = storage if storage is not None else f"sqlite:///{(folder / 'study.db').resolve()}"
    return TuneSpec(
        preset=p.name, algorithm=algorithm, trials=int(trials), rounds=exp.run.rounds, objective=objective,
        predictor=predictor, seed=int(seed), out=folder, storage=url, own_storage=own, base=base, space=space,
        table=table, sets={k: v for k, v in user.items()}, jobs=int(jobs), quiet=quiet,
    )


# ------------------------------------------------------------------------------------------------ storage
def _storage(spec: TuneSpec) -> optuna.storages.RDBStorage:
    import optuna

    kwargs: dict[str, Any] = {}
    if spec.storage.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # several processes wait for the write lock
    if not spec.own_storage:  # a shared storage: a dead worker's RUNNING trial is failed once its heartbeat is stale
        kwargs.update(heartbeat_interval=60, grace_period=240)
    try:
        return optuna.storages.RDBStorage(spec.storage, **kwargs)
    except Exception as e:  # an unreachable database or a bad URL: a configuration problem
        raise ConfigError(f"cannot open Optuna storage {spec.storage!r}: {e}") from None


def _mismatch(attrs: Mapping[str, Any], ident: Mapping[str, Any], where: str) -> str | None:
    for key in IDENTITY_KEYS:
        have, want = attrs.get(key), ident[key]
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            sub = diff[0]
            return (f"{where} holds a study with another {key}: {key} '{sub}' is {have.get(sub)!r} there and "
                    f"{want.get(sub)!r} in this command (differing: {diff})")
        return f"{where} holds a study with {key} = {have!r}; this command has {key} = {want!r}"
    return None


def check_identity(spec: TuneSpec) -> None:
    """Refuse (``ConfigError`` naming the key) to continue a study made with another preset, algorithm, rounds,
    objective, predictor, search space or trial config; reads only, so nothing is changed."""
    if spec.own_storage and not (spec.out / "study.db").exists():
        return
    import optuna

    ident = spec.identity()
    where = str(spec.out) if spec.own_storage else f"storage {spec.storage}"
    for s in optuna.get_all_study_summaries(_storage(spec), include_best_trial=False):
        if not spec.own_storage and s.study_name != spec.study_name:
            continue  # a shared storage holds many studies, one per preset.algorithm
        msg = _mismatch(s.user_attrs, ident, where)
        if msg is not None:
            raise ConfigError(f"{msg}. Use another --out (or --storage); nothing was changed")


class _FolderLock:
    """An exclusive ``flock`` on ``DIR/.tune.lock`` while a command works on the folder's own study."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".tune.lock"
        self.fh: Any = None

    def __enter__(self) -> _FolderLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.fh = open(self.path, "w")  # held until __exit__
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise ConfigError(f"another `fedbayes tune` is working on {self.path.parent}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()


def _open_study(spec: TuneSpec) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or load the study; a new one gets the identity attributes, an existing one is checked again."""
    import optuna

    storage = _storage(spec)
    study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,  # type: ignore[arg-type]
                                load_if_exists=True)
    ident = spec.identity()
    if not study.user_attrs:
        for k, v in ident.items():
            study.set_user_attr(k, v)
    else:
        msg = _mismatch(study.user_attrs, ident, str(spec.out) if spec.own_storage else spec.storage)
        if msg is not None:
            raise ConfigError(f"{msg}. Use another --out (or --storage); nothing was changed")
    return study, storage


def _fail_stale(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[int]:
    """Mark trials left RUNNING (by a killed process) FAIL; returns their numbers."""
    from optuna.trial import TrialState

    sid = storage.get_study_id_from_name(study.study_name)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
        storage.set_trial_user_attr(tid, "fail-reason", "left RUNNING by a stopped process; marked FAIL on resume")
        storage.set_trial_state_values(tid, TrialState.FAIL)
        failed.append(t.number)
    return failed


def _counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for t in study.get_trials(deepcopy=False):
        key = t.state.name.lower()
        out[key] = out.get(key, 0) + 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


# ------------------------------------------------------------------------------------------------ trials
class Diverged(FloatingPointError):
    """A trial's validation metric is not finite."""


def make_objective(spec: TuneSpec) -> Callable[[optuna.Trial], float]:
    """The Optuna objective: one in-process run with the sampled values; reports every evaluated round."""
    import optuna

    from fedbayes import engine

    def objective(trial: optuna.Trial) -> float:
        params = {k: dim.suggest(trial, k) for k, dim in spec.space.items()}
        exp = resolve({**spec.base, **params})
        values: list[float] = []

        def on_round(row: dict[str, Any]) -> None:
            if spec.metric not in row:
                return
            v = float(row[spec.metric])
            if not math.isfinite(v):
                raise Diverged(f"round {row['round']}: {spec.metric} = {v}")
            values.append(v)
            trial.report(v, int(row["round"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"round {row['round']}: {spec.metric} = {v:.4g}")

        t0 = time.perf_counter()
        try:
            engine.run_experiment(exp, None, progress=False, on_round=on_round)
        except (ArithmeticError, ValueError, RuntimeError) as e:  # diverged (or every client failed): pruned
            trial.set_user_attr("diverged", f"{type(e).__name__}: {e}"[:500])
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        if not values:
            trial.set_user_attr("diverged", f"no {spec.metric} in any round")
            raise optuna.TrialPruned(f"no {spec.metric}")
        return float(np.mean(values[-LAST_ROUNDS:]))

    return objective


def _sampler_seed(spec: TuneSpec, finished: int, worker: int, attempt: int) -> int:
    """Distinct per worker and per restart (a resumed study must not replay the first run's random startup
    points), reproducible for a fresh study."""
    return int(np.random.SeedSequence([spec.seed, finished, worker, attempt]).generate_state(1)[0])


def _samplers(spec: TuneSpec, seed: int) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, spec.rounds // 4))
    return sampler, pruner


def _report_trial(spec: TuneSpec) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            write_best(study, spec)
        except Exception as e:  # best files are a convenience; never stop the study for them
            print(f"[tune] could not write best files: {e}", flush=True)
        if spec.quiet:
            return
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        if trial.value is not None:
            val = f"{spec.metric}={trial.value:.4f}"
        elif "diverged" in trial.user_attrs:
            val = f"diverged ({trial.user_attrs['diverged']})"
        else:
            val = f"at round {max(trial.intermediate_values, default=0)}"
        print(f"[tune] trial {trial.number} {trial.state.name} {val} ({params})", flush=True)

    return callback


def _worker(args: tuple[TuneSpec, int, int, int]) -> None:
    """Run ``n`` trials of the study (also the body of each ``--jobs`` process)."""
    spec, n, seed, parallel = args
    import optuna
    from optuna.trial import TrialState

    if parallel:
        import torch

        torch.set_num_threads(1)
        _die_with_parent()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, pruner = _samplers(spec, seed)
    study = optuna.load_study(study_name=spec.study_name, storage=_storage(spec), sampler=sampler, pruner=pruner)
    study.optimize(
        make_objective(spec), n_trials=n,
        callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                   _report_trial(spec)],
    )


def _die_with_parent() -> None:
    """Linux: a ``--jobs`` worker gets SIGKILL when the command dies, so no orphan keeps writing trials."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _shares(n: int, jobs: int) -> list[int]:
    j = max(1, min(jobs, n))
    return [n // j + (1 if i < n % j else 0) for i in range(j)]


# ------------------------------------------------------------------------------------------------ outputs
def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        s = f"{v:.6g}"
        return s if any(c in s for c in ".e") else s + ".0"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def toml_table(name: str, table: Mapping[str, Any]) -> str:
    """``[name]`` and its ``key = value`` lines (floats with 6 significant digits)."""
    return f"[{name}]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in table.items())


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def write_best(study: optuna.Study, spec: TuneSpec) -> dict[str, Any] | None:
    """``best.toml`` and ``best.json`` from the study's best complete trial (None if there is none yet)."""
    if not _complete(study):
        return None
    best = study.best_trial
    counts = _counts(study)
    table = {**spec.table, **best.params}
    # values fixed by --set arrive as strings ("1.0"): write them with the types the config gives them
    typed = resolve({**spec.base, **table, "algorithm": spec.algorithm}).to_flat()
    table = {k: typed.get(k.replace("_", "-"), v) for k, v in table.items()}
    attrs = study.user_attrs
    split = attrs.get("validation-split", {})
    info = {
        "study": spec.study_name, "storage": spec.storage, "preset": spec.preset, "algorithm": spec.algorithm,
        "objective": spec.objective, "predictor": spec.predictor, "metric": spec.metric,
        "direction": spec.direction, "last-rounds": LAST_ROUNDS, "rounds": spec.rounds,
        "trials": {"requested": spec.trials, **counts},
        "best": {"trial": best.number, "value": best.value, "params": best.params},
        "table": table, "search-space": describe_space(spec.space), "sets": spec.sets, "validation-split": split,
    }
    goal = "minimise" if spec.direction == "minimize" else "maximise"
    fixed = sorted(k for k in spec.sets if k in REGISTRY[spec.algorithm].search_space)
    other_sets = {k: v for k, v in spec.sets.items() if k not in fixed}
    head = [
        f"# fedbayes tune: best hyperparameters of {spec.algorithm} on preset {spec.preset}",
        f"# study: {spec.study_name} in {spec.storage}",
        f"# trials: {counts['finished']} finished of {spec.trials} requested ({counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed)",
        f"# budget: {spec.rounds} rounds per trial; validation-fraction {spec.base['validation-fraction']}"
        + (f" ({split.get('num-validation')} {split.get('source')} examples, split {split.get('sha256-16')})"
           if split else ""),
        f"# objective: {goal} {spec.metric}, mean of the last {LAST_ROUNDS} evaluated rounds; best value "
        f"{best.value:.6g} (trial {best.number})",
        f"# tuned: {', '.join(sorted(spec.space))}" + (f"; fixed by --set: {', '.join(fixed)}" if fixed else "")
        + "; every other key as in the preset",
    ]
    if other_sets:
        head.append("# trials also ran with --set " + " ".join(f"{k}={v}" for k, v in other_sets.items())
                    + " (not written below)")
    head.append(f"# apply: fedbayes tune-apply {spec.out} --preset {spec.preset} --out NEW.toml")
    text = "\n".join(head) + "\n" + toml_table(f"algorithms.{spec.algorithm}", table)
    spec.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(spec.out / "best.toml", text.encode())
    atomic_write_bytes(spec.out / "best.json", (json.dumps(info, indent=1, default=str) + "\n").encode())
    return info


def write_plots(study: optuna.Study, spec: TuneSpec) -> tuple[list[Path], list[str]]:
    """history.png, importance.png (>= 2 complete trials) and curves.png; returns (paths, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    paths: list[Path] = []
    notes: list[str] = []
    complete = _complete(study)

    def save(name: str, fn: Callable[[], Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for its matplotlib plots
            try:
                ax = fn()
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                notes.append(f"{name}: skipped ({e})")
                plt.close("all")
                return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        p = spec.out / name
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

    if complete:
        save("history.png", lambda: ovm.plot_optimization_history(study, target_name=spec.metric))
    else:
        notes.append("history.png: skipped (no complete trial)")
    if len(complete) >= 2 and spec.space:
        save("importance.png", lambda: ovm.plot_param_importances(study, target_name=spec.metric))
    else:
        notes.append(f"importance.png: skipped (needs 2 complete trials, has {len(complete)})")
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if trials:
        fig, ax = plt.subplots(figsize=(8, 5))
        for t in trials:
            steps = sorted(t.intermediate_values)
            style = "-" if t.state == optuna.trial.TrialState.COMPLETE else ":"
            ax.plot(steps, [t.intermediate_values[s] for s in steps], style, alpha=0.7, lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel(spec.metric)
        ax.set_title(f"{spec.study_name}: {spec.metric} per round (dotted: pruned)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = spec.out / "curves.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths, notes


# ------------------------------------------------------------------------------------------------ driver
def _split_summary(spec: TuneSpec) -> dict[str, Any]:
    """The validation split every trial uses (one data load; also checks the dataset is there)."""
    from fedbayes.engine import Federation

    fed = Federation.build(resolve({**spec.base, "device": "cpu", "store": "memory"}))
    assert fed.validation is not None
    return fed.validation.summary()


def tune(spec: TuneSpec) -> dict[str, Any]:
    """Run (or continue) the study until it holds ``spec.trials`` finished trials; write best files and plots.

    Returns
    -------
    dict
        ``best.json``'s content (None values if no trial completed) plus ``plots`` and ``notes``.

    Raises
    ------
    ConfigError
        The folder or storage holds another study (nothing is changed), or another command holds the folder.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_identity(spec)  # before anything is written
    split = _split_summary(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    with _FolderLock(spec.out) if spec.own_storage else _NoLock():
        study, storage = _open_study(spec)
        if study.user_attrs.get("validation-split") not in (None, split):
            raise ConfigError(f"{spec.out}: the study's validation split {study.user_attrs['validation-split']} "
                              f"differs from this command's {split}; nothing was changed")
        study.set_user_attr("validation-split", split)
        start = _preset_point(spec)
        if start and not study.get_trials(deepcopy=False):
            study.enqueue_trial(start)  # trial 0 is the preset's own point (see _preset_point)
            study.set_user_attr("enqueued-preset-point", start)
        if spec.own_storage:
            stale = _fail_stale(study, storage)
            if stale and not spec.quiet:
                print(f"[tune] trials {stale} were left RUNNING by a stopped run: marked FAIL", flush=True)
        attempt = 0
        while True:
            counts = _counts(study)
            remaining = spec.trials - counts["finished"]
            if remaining <= 0 or attempt >= 3:
                break
            if not spec.quiet:
                print(f"[tune] {spec.study_name}: {counts['finished']}/{spec.trials} finished; running {remaining} "
                      f"trial(s) with {min(spec.jobs, remaining)} process(es) -> {spec.out}", flush=True)
            shares = _shares(remaining, spec.jobs)
            work = [(spec, n, _sampler_seed(spec, counts["finished"], i, attempt), int(len(shares) > 1))
                    for i, n in enumerate(shares)]
            if len(work) == 1:
                _worker(work[0])
            else:
                ctx = mp.get_context("spawn")
                procs = [ctx.Process(target=_worker, args=(w,)) for w in work]
                for pr in procs:
                    pr.start()
                for pr in procs:
                    pr.join()
                bad = [pr.exitcode for pr in procs if pr.exitcode]
                if bad:
                    raise RuntimeError(f"{len(bad)} tune worker process(es) failed (exit codes {bad})")
            attempt += 1
            after = _counts(study)
            if after["finished"] == counts["finished"]:
                break  # no progress (every trial failed): stop rather than loop
        counts = _counts(study)
        info = write_best(study, spec) or {"best": None, "trials": {"requested": spec.trials, **counts}}
        paths, notes = write_plots(study, spec)
    info["plots"] = [str(p) for p in paths]
    info["notes"] = notes
    if counts["finished"] < spec.trials:
        notes.append(f"only {counts['finished']} of {spec.trials} trials finished ({counts['fail']} failed)")
    return info


def _preset_point(spec: TuneSpec) -> dict[str, Any]:
    """The preset's values of the search-space keys that lie inside the space.

    A fresh study evaluates this point first (``study.enqueue_trial``), so every method's search starts from
    its current preset (e.g. an earlier study's best) and a study can only improve on it; TPE's random
    start-up trials follow.  Keys the preset does not set, or sets outside the space, are sampled as usual."""
    return {k: spec.table[k] for k, dim in spec.space.items() if k in spec.table and dim.contains(spec.table[k])}


class _NoLock:
    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------------------------------------ tune-apply
def apply_best(dirs: Sequence[str | Path], preset: str, out: str | Path) -> Path:
    """Merge the ``best.toml`` of each study folder (or a best.toml path) into a copy of ``preset``.

    Each best table replaces the preset's table of its algorithm (it is that table with the tuned values
    merged in); the result is validated like any preset.

    Raises
    ------
    ConfigError
        A folder without best.toml, one tuned on another preset, two studies of one algorithm, ``out`` equal to
        the preset's own file, or a result that does not validate (then nothing is left at ``out``).
    """
    src = load_preset(preset)
    src_path = Path(preset) if Path(preset).suffix else PRESET_DIR / f"{preset}.toml"
    target = Path(out)
    if target.suffix != ".toml":
        raise ConfigError(f"--out must be a .toml file, got {target}")
    if target.resolve() == src_path.resolve():
        raise ConfigError(f"--out {target} is the preset itself; write the tuned preset to another file")
    tables: dict[str, dict[str, Any]] = {}
    sources: list[str] = []
    for d in dirs:
        path = Path(d)
        best = path if path.suffix == ".toml" else path / "best.toml"
        if not best.is_file():
            raise ConfigError(f"{d}: no best.toml (has `fedbayes tune` finished a trial there?)")
        meta = best.with_name("best.json")
        if meta.is_file():
            tuned_on = json.loads(meta.read_text()).get("preset")
            if tuned_on is not None and tuned_on != src.name:
                raise ConfigError(f"{d} was tuned on preset '{tuned_on}', not '{src.name}'")
        try:
            data = tomllib.loads(best.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{best}: {e}") from None
        algos = data.get("algorithms", {})
        if set(data) != {"algorithms"} or len(algos) != 1:
            raise ConfigError(f"{best}: expected exactly one [algorithms.NAME] table")
        [(name, table)] = list(algos.items())
        if name in tables:
            raise ConfigError(f"two studies of algorithm '{name}' given ({best}); pass one per algorithm")
        tables[name] = dict(table)
        sources.append(f"{name}: {best}")
    algorithms = {**src.algorithms, **tables}
    lines = [f"# generated by `fedbayes tune-apply` from preset {src.name} with tuned tables of:"]
    lines += [f"#   {s}" for s in sources]
    base_desc = re.sub(r" \(tuned: [^)]*\)$", "", src.description)  # re-tuning a tuned preset: one note, not two
    lines += ["", f"description = {_toml_value(base_desc + ' (tuned: ' + ', '.join(tables) + ')')}", ""]
    lines.append(toml_table("base", src.base))
    for name, table in algorithms.items():
        lines.append(toml_table(f"algorithms.{name}", table))
    if src.centralized:
        lines.append(toml_table("centralized", src.centralized))
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, "\n".join(lines).encode())
    try:
        load_preset(str(target))
    except ConfigError:
        target.unlink(missing_ok=True)
        raise
    return target


# ------------------------------------------------------------------------------------------------ CLI
def cmd_tune(args: argparse.Namespace) -> int:
    spec = make_spec(
        args.preset, args.algorithm, args.trials, rounds=args.rounds, jobs=args.jobs, seed=args.seed, out=args.out,
        storage=args.storage, sets=parse_sets(args.set), objective=args.objective, predictor=args.predictor,
        quiet=args.quiet,
    )
    info = tune(spec)
    best = info.get("best")
    if best:
        print(f"[tune] best {spec.metric} = {best['value']:.6g} (trial {best['trial']}): "
              + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
        print(f"[tune] {spec.out / 'best.toml'} and best.json; plots: {', '.join(info['plots']) or 'none'}")
    else:
        print(f"[tune] no trial completed yet in {spec.out}")
    for note in info["notes"]:
        print(f"[tune] note: {note}")
    return 0


def cmd_tune_apply(args: argparse.Namespace) -> int:
    path = apply_best(args.dirs, args.preset, args.out)
    print(f"[tune] tuned preset written to {path}; run it with `fedbayes compare --preset {path}`")
    return 0


def add_subparsers(sub: Any) -> None:
    """``tune`` and ``tune-apply`` on the ``fedbayes`` command."""
    t = sub.add_parser("tune", help="tune an algorithm's hyperparameters on a validation split (Optuna TPE)")
    t.add_argument("--preset", required=True)
    t.add_argument("--algorithm", required=True)
    t.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    t.add_argument("--rounds", type=int, help="rounds per trial (default: the preset's)")
    t.add_argument("--jobs", type=int, default=1, help="trials in parallel (processes sharing the storage)")
    t.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (the runs use the preset's seed)")
    t.add_argument("--out", help="study folder (default runs/tune/PRESET/ALGORITHM)")
    t.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key for every trial")
    t.add_argument("--objective", choices=sorted(OBJECTIVES), default="nll",
                   help="nll: minimise validation NLL; accuracy: maximise validation accuracy (last 3 rounds)")
    t.add_argument("--predictor", choices=["mean", "bma"], default="mean",
                   help="score the global mean's prediction or (Bayesian rules) the posterior average")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_tune)

    a = sub.add_parser("tune-apply", help="merge best.toml files of tune studies into a copy of a preset")
    a.add_argument("dirs", nargs="+", metavar="DIR", help="study folders (or best.toml files)")
    a.add_argument("--preset", required=True)
    a.add_argument("--out", required=True, help="the tuned preset to write (a .toml path)")
    a.set_defaults(fn=cmd_tune_apply)

