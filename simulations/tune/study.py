"""The Optuna study: its storage and identity, the trials (one in-process run each), the workers and the driver."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbayes.config import ConfigError, resolve
from fedbayes.noise import share_cores

if TYPE_CHECKING:
    import optuna
from simulations.tune.outputs import _counts, write_best, write_plots
from simulations.tune.spec import IDENTITY_DEFAULTS, IDENTITY_KEYS, LAST_ROUNDS, OBJECTIVES, TuneSpec


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
        have, want = attrs.get(key, IDENTITY_DEFAULTS.get(key)), ident[key]
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



# ------------------------------------------------------------------------------------------------ trials
class Diverged(FloatingPointError):
    """A trial's validation metric is not finite."""


def metric_keys(spec: TuneSpec) -> dict[str, str]:
    """Every objective's metrics.jsonl key for the spec's predictor, e.g. ``{"nll": "val_nll", "accuracy":
    "val_accuracy"}``: each trial records all of them (user attributes), whichever one the study optimises."""
    prefix = "bma_" if spec.predictor == "bma" else ""
    return {name: f"{prefix}val_{metric}" for name, (_, metric) in OBJECTIVES.items()}


def make_objective(spec: TuneSpec) -> Callable[[optuna.Trial], float]:
    """The Optuna objective: one in-process run with the sampled values; reports every evaluated round.

    A trial that completes also records, as user attributes, the mean of the last :data:`LAST_ROUNDS` rounds of
    every objective's metric (:func:`metric_keys`: ``val_accuracy`` and ``val_nll``), so one study can name the
    best trial for either objective; every trial records ``seconds`` (wall) and ``cpu-seconds`` (this process's
    CPU time, all its threads)."""
    import optuna

    from fedbayes import engine

    keys = metric_keys(spec)

    def objective(trial: optuna.Trial) -> float:
        params = {k: dim.suggest(trial, k) for k, dim in spec.space.items()}
        exp = resolve({**spec.base, **params})
        values: list[float] = []
        others: dict[str, list[float]] = {k: [] for k in keys.values()}

        def on_round(row: dict[str, Any]) -> None:
            for k, seen in others.items():
                if k in row:
                    seen.append(float(row[k]))
            if spec.metric not in row:
                return
            v = float(row[spec.metric])
            if not math.isfinite(v):
                raise Diverged(f"round {row['round']}: {spec.metric} = {v}")
            values.append(v)
            trial.report(v, int(row["round"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"round {row['round']}: {spec.metric} = {v:.4g}")

        t0, c0 = time.perf_counter(), time.process_time()
        try:
            engine.run_experiment(exp, None, progress=False, on_round=on_round)
        except (ArithmeticError, ValueError, RuntimeError) as e:  # diverged (or every client failed): pruned
            trial.set_user_attr("diverged", f"{type(e).__name__}: {e}"[:500])
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            trial.set_user_attr("cpu-seconds", round(time.process_time() - c0, 2))
        if not values:
            trial.set_user_attr("diverged", f"no {spec.metric} in any round")
            raise optuna.TrialPruned(f"no {spec.metric}")
        for k, seen in others.items():
            if seen:
                trial.set_user_attr(k, float(np.mean(seen[-LAST_ROUNDS:])))
        return float(np.mean(values[-LAST_ROUNDS:]))

    return objective


def _sampler_seed(spec: TuneSpec, finished: int, worker: int, attempt: int) -> int:
    """Distinct per worker and per restart (a resumed study must not replay the first run's random startup
    points), reproducible for a fresh study."""
    return int(np.random.SeedSequence([spec.seed, finished, worker, attempt]).generate_state(1)[0])


def make_pruner(name: str, rounds: int) -> optuna.pruners.BasePruner:
    """The pruner ``--pruner NAME`` names, over the rounds (steps) of a ``rounds``-round trial.

    * ``median`` (``fedbayes tune``'s default, unchanged): stop a trial whose value is worse than the median of
      earlier trials at the same round, after 5 trials and a warm-up of a quarter of the rounds;
    * ``hyperband`` (``compare --tune``'s default): Optuna's HyperbandPruner, reduction factor 3, from
      ``max(1, rounds // 8)`` to ``rounds`` rounds: several successive-halving brackets with different first
      rungs, so some trials are judged only late (a slow starter, e.g. a small learning rate, is not lost to
      round-1 noise) while others are stopped early;
    * ``halving``: one successive-halving bracket (SuccessiveHalvingPruner) with the same minimum and factor,
      the most aggressive;
    * ``none``: every trial runs all rounds.
    """
    import optuna

    first = max(1, rounds // 8)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, rounds // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=rounds, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner '{name}'")


def _samplers(spec: TuneSpec, seed: int) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))
    return sampler, make_pruner(spec.pruner, spec.rounds)


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


# ------------------------------------------------------------------------------------------------ driver
def _split_summary(spec: TuneSpec) -> dict[str, Any]:
    """The validation split every trial uses (one data load; also checks the dataset is there)."""
    from fedbayes.federation import Federation

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
    from optuna.trial import TrialState

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
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            if waiting and len(shares) > 1:
                # Optuna may hand an enqueued (WAITING) trial to every worker that asks at once (optuna#4002):
                # two workers ran trial 0 and the second died on "Cannot tell a COMPLETE trial". One process
                # runs the enqueued trials first; the parallel workers follow (this pass is not an attempt).
                _worker((spec, waiting, _sampler_seed(spec, counts["finished"], 0, attempt), 0))
                continue
            work = [(spec, n, _sampler_seed(spec, counts["finished"], i, attempt), int(len(shares) > 1))
                    for i, n in enumerate(shares)]
            if len(work) == 1:
                _worker(work[0])
            else:
                share_cores(len(work))  # one-thread workers filling the cores: no noise thread (fedbayes.noise)
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
