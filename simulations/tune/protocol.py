"""``fedbayes compare --tune N``: the whole comparison protocol from one command (issue 26 §3).

``fedbayes compare --tune N --preset P --algorithms A,B,… [--seeds S,…] [--jobs J] [--objective both]
[--pruner hyperband] --out DIR`` does, in order:

1. **Tune** every rule with the same budget, N finished trials (complete or pruned) of
   ``rounds`` rounds each, on the validation split (:mod:`simulations.tune`; the test set is never read).  One
   Optuna study per rule in ``DIR/tune/RULE/study.db``, ``--jobs`` processes per study.  Every study is checked
   against the command first (:func:`simulations.tune.study.check_identity`: preset, rule, rounds, objective,
   predictor, pruner, search space, trial config); a folder made with other settings is refused before anything
   is written, naming the key.
2. **Choose** each rule's best setting on validation only, for each objective asked: the trial with the best
   mean of the last 3 rounds' ``val_accuracy`` (maximised) or ``val_nll`` (minimised) among the *first N
   finished* trials (by trial number: a study continued with a larger N elsewhere does not give that rule a
   larger budget here).  Every trial records both metrics (user attributes ``val_accuracy`` and ``val_nll``),
   so **one study serves both objectives** (``--objective both``, the default): it optimises and **prunes by
   validation accuracy** (the headline objective), and the NLL-best is chosen among the trials that pruning by
   accuracy let finish.  A pruned trial has no last-3 value, so it is never a best, for either objective.  The
   NLL table is therefore "the best NLL the accuracy search found", not a separate NLL search; ask
   ``--objective nll`` (in another ``--out``) for a study optimised and pruned by NLL.  Each choice is written
   as a preset fragment ``DIR/tune/RULE/best-OBJECTIVE.toml`` and merged into ``DIR/OBJECTIVE/preset.toml``
   (:func:`simulations.tune.outputs.apply_best`: a preset anyone can rerun).
3. **Final runs** on the test set (``eval-split = "test"``) over ``--seeds`` with each rule's chosen setting,
   plus the pooled-data rows unless ``--no-centralized``: ``DIR/OBJECTIVE/RULE/seed-S``.  A run whose
   resolved config is the same for both objectives (the same trial won both, or the pooled rows) runs once,
   in the accuracy folder, and both tables read it.  Folders are reused, continued or refused as
   :func:`simulations.compare.plan_cells` says.
4. **Tables and plots** per objective (``DIR/OBJECTIVE/table.md``, ``table.csv``, ``accuracy.png``,
   ``nll.png``), and ``DIR/table.md``: the accuracy-tuned table (headline), then the NLL-tuned one, then the
   chosen settings with their validation numbers.  ``DIR/protocol.json`` records the budget, the objectives,
   the pruner and the pruning rule, per rule the trials finished / pruned / failed and the CPU seconds of its
   study, the chosen trials, and the final runs' folders.

Resuming.  Rerunning the same command after a kill continues: finished trials are kept, the trial a killed
process left RUNNING is marked FAIL and replaced, and finished final runs are reused (unfinished ones continue
from their checkpoints).  CPU seconds are those of the trials that ended (a killed trial's time is lost).

Pruning (``--pruner``, :func:`simulations.tune.study.make_pruner`): the default is Optuna's ``hyperband``
(HyperbandPruner over rounds, reduction factor 3, first rung at ``max(1, rounds // 8)`` rounds).  Why: it
affords a larger N at the same CPU (most trials stop after a fraction of the rounds), it is Optuna's
recommended pruner for its TPE sampler, and, unlike one successive-halving bracket (``halving``) or the median
rule, its brackets judge some trials only at late rounds, so a setting that starts slowly but ends best (a small
learning rate, a strong prior) is not always cut on early-round noise.  ``none`` runs every trial to the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbayes.config import ConfigError, resolve
from fedbayes.keys import kebab
from fedbayes.presets import load_preset
from fedbayes.results import atomic_write_bytes
from simulations.tune.outputs import _counts, apply_best, toml_table
from simulations.tune.spec import LAST_ROUNDS, OBJECTIVES, TuneSpec, make_spec

if TYPE_CHECKING:
    import optuna

OBJECTIVE_CHOICES = ("both", "accuracy", "nll")
"""``compare --tune``'s ``--objective``: ``both`` (one study, optimised and pruned by accuracy, both tables)."""
DEFAULT_PRUNER = "hyperband"
"""``compare --tune``'s default ``--pruner`` (see the module docstring for why)."""
HEADLINE = "accuracy"
"""The objective of the headline table and of the study when both are asked."""


@dataclass(frozen=True)
class Protocol:
    """A validated ``compare --tune`` command."""

    preset: str
    algorithms: list[str]
    trials: int
    seeds: list[int]
    out: Path
    objectives: list[str]
    study_objective: str
    pruner: str
    specs: dict[str, TuneSpec]
    final_sets: dict[str, Any]
    jobs: int = 1
    centralized: bool = True
    force: bool = False
    quiet: bool = False
    command: list[str] = field(default_factory=list)


def make_protocol(
    preset: str,
    algorithms: list[str],
    trials: int,
    seeds: list[int],
    out: str | Path,
    *,
    rounds: int | None = None,
    tune_rounds: int | None = None,
    sets: dict[str, Any] | None = None,
    jobs: int = 1,
    objective: str = "both",
    pruner: str = DEFAULT_PRUNER,
    centralized: bool = True,
    force: bool = False,
    quiet: bool = False,
    seed: int = 0,
    command: list[str] | None = None,
) -> Protocol:
    """Validate the command: every rule's study spec (:func:`simulations.tune.make_spec`), before anything runs.

    Raises
    ------
    ConfigError
        Bad ``--tune N`` or ``--objective``, no algorithm or one twice, no seed, or anything :func:`make_spec`
        refuses (named with the rule).
    """
    if objective not in OBJECTIVE_CHOICES:
        raise ConfigError(f"unknown --objective '{objective}'; valid: {list(OBJECTIVE_CHOICES)}")
    if trials < 1:
        raise ConfigError(f"--tune N must be >= 1 (finished trials per rule), got {trials}")
    if tune_rounds is not None and tune_rounds < 1:
        raise ConfigError(f"--tune-rounds must be >= 1, got {tune_rounds}")
    if not algorithms:
        raise ConfigError("--tune needs at least one algorithm (--algorithms A,B or a preset that lists some)")
    twice = sorted({a for a in algorithms if algorithms.count(a) > 1})
    if twice:
        raise ConfigError(f"--algorithms names {twice} more than once")
    if not seeds:
        raise ConfigError("--seeds: at least one seed")
    objectives = [HEADLINE, "nll"] if objective == "both" else [objective]
    study_objective = objectives[0]
    folder = Path(out)
    specs = {}
    for algo in algorithms:
        specs[algo] = make_spec(preset, algo, trials, rounds=tune_rounds or rounds, jobs=jobs, seed=seed,
                                out=folder / "tune" / algo, sets=sets, objective=study_objective, quiet=quiet,
                                pruner=pruner)
    final_sets = {**(sets or {}), "eval-split": "test"}
    if rounds is not None:
        final_sets["rounds"] = rounds
    return Protocol(preset=preset, algorithms=list(algorithms), trials=int(trials), seeds=[int(s) for s in seeds],
                    out=folder, objectives=objectives, study_objective=study_objective, pruner=pruner, specs=specs,
                    final_sets=final_sets, jobs=int(jobs), centralized=centralized, force=force, quiet=quiet,
                    command=list(command or []))


# ------------------------------------------------------------------------------------------------ choosing
def _value(trial: optuna.trial.FrozenTrial, spec: TuneSpec, objective: str) -> float | None:
    from simulations.tune.study import metric_keys

    v = trial.value if objective == spec.objective else trial.user_attrs.get(metric_keys(spec)[objective])
    return float(v) if v is not None and math.isfinite(float(v)) else None


def counted_trials(study: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``n`` finished (complete or pruned) trials by number: the budget every rule gets."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return sorted(done, key=lambda t: t.number)[:n]


def choose(study: optuna.Study, spec: TuneSpec, n: int, objective: str) -> optuna.trial.FrozenTrial | None:
    """The best complete trial for ``objective`` among :func:`counted_trials` (ties: the lower number); None
    when none completed."""
    from optuna.trial import TrialState

    sign = 1.0 if OBJECTIVES[objective][0] == "minimize" else -1.0
    scored = [(sign * v, t.number, t) for t in counted_trials(study, n)
              if t.state == TrialState.COMPLETE and (v := _value(t, spec, objective)) is not None]
    return min(scored, key=lambda x: (x[0], x[1]))[2] if scored else None


def _fragment(spec: TuneSpec, trial: optuna.trial.FrozenTrial, objective: str, n: int) -> Path:
    """``best-OBJECTIVE.toml`` beside the study: the preset's table with the chosen trial's values."""
    from simulations.tune.study import metric_keys

    table = {**spec.table, **trial.params}
    typed = resolve({**spec.base, **table, "algorithm": spec.algorithm}).to_flat()
    table = {k: typed.get(kebab(k), v) for k, v in table.items()}
    keys = metric_keys(spec)
    vals = ", ".join(f"{keys[o]} {trial.user_attrs[keys[o]]:.6g}" for o in OBJECTIVES if keys[o] in trial.user_attrs)
    head = [
        f"# fedbayes compare --tune: {spec.algorithm}'s {objective}-best setting on preset {spec.preset}",
        f"# trial {trial.number} of the first {n} finished trials of {spec.storage} (validation split only)",
        f"# validation, mean of the last {LAST_ROUNDS} of {spec.rounds} rounds: {vals}",
    ]
    path = spec.out / f"best-{objective}.toml"
    atomic_write_bytes(path, ("\n".join(head) + "\n" + toml_table(f"algorithms.{spec.algorithm}", table)).encode())
    return path


def _study_record(study: optuna.Study, spec: TuneSpec, n: int) -> dict[str, Any]:
    counted = counted_trials(study, n)
    trials = study.get_trials(deepcopy=False)
    return {
        "study": str(spec.out / "study.db"),
        "trials": {**_counts(study), "counted": len(counted)},
        "cpu-seconds": round(sum(float(t.user_attrs.get("cpu-seconds", 0.0)) for t in trials), 2),
        "wall-seconds": round(sum(float(t.user_attrs.get("seconds", 0.0)) for t in trials), 2),
        "counted-cpu-seconds": round(sum(float(t.user_attrs.get("cpu-seconds", 0.0)) for t in counted), 2),
    }


# ------------------------------------------------------------------------------------------------ the protocol
PRUNING_RULE = ("Trials are pruned by the study's objective ({study}) at the rounds the {pruner} pruner checks; a "
                "pruned trial is never a best. {both}")
SELECTION_RULE = ("Each rule's setting is the trial with the best mean of the last {last} rounds' validation metric "
                  "among its study's first {n} finished (complete or pruned) trials; the test set is read only by "
                  "the final runs.")


def run_protocol(p: Protocol) -> dict[str, Any]:
    """Tune, choose, run and tabulate (see the module docstring); returns what ``protocol.json`` holds.

    Raises
    ------
    ConfigError
        A study folder made with other settings (nothing written), or another command holds a study folder.
    RunExistsError
        Final-run folders made with other settings (without ``force``); the studies are kept.
    """
    import optuna

    from simulations.compare import cell_folder, grid_rows, reported_predictions, run_cells, summarize
    from simulations.tune.study import _storage, check_identity, tune

    for spec in p.specs.values():  # every study is checked before any is touched
        check_identity(spec)
    p.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = _header(p)
    for algo, spec in p.specs.items():
        if not p.quiet:
            print(f"[compare --tune] tuning {algo}: {p.trials} trials on the validation split -> {spec.out}",
                  flush=True)
        tune(spec)
    chosen: dict[str, dict[str, Any]] = {o: {} for o in p.objectives}
    fragments: dict[str, list[Path]] = {o: [] for o in p.objectives}
    for algo, spec in p.specs.items():
        study = optuna.load_study(study_name=spec.study_name, storage=_storage(spec))
        rec = _study_record(study, spec, p.trials)
        rec["best"] = {}
        for o in p.objectives:
            t = choose(study, spec, p.trials, o)
            if t is None:
                rec["best"][o] = None
                record["notes"].append(f"{algo}: no complete trial among the first {p.trials}: its {o}-tuned runs "
                                       "use the preset's values")
                continue
            fragments[o].append(_fragment(spec, t, o, p.trials))
            rec["best"][o] = {"trial": t.number, "params": dict(t.params),
                              **{k: v for k, v in t.user_attrs.items() if k.endswith(("val_accuracy", "val_nll"))}}
            chosen[o][algo] = rec["best"][o]
        record["rules"][algo] = rec
    _write(p, record)

    # final runs on the test set: one cell per distinct resolved config, shared between the objectives' tables
    cells: list[tuple[dict[str, Any], Path]] = []
    folders: dict[str, dict[str, list[Path]]] = {o: {} for o in p.objectives}
    seen: dict[str, Path] = {}
    presets = {}
    for o in p.objectives:
        tuned = apply_best(fragments[o], p.preset, p.out / o / "preset.toml")
        presets[o] = load_preset(str(tuned))
        for name, cfg in grid_rows(presets[o], p.algorithms, p.seeds, p.final_sets, p.centralized):
            key = json.dumps(resolve(cfg).to_flat(), sort_keys=True, default=str)
            if key not in seen:
                seen[key] = cell_folder(p.out / o, name, cfg)
                cells.append((cfg, seen[key]))
            folders[o].setdefault(name, []).append(seen[key])
    if not p.quiet:
        print(f"[compare --tune] final runs on the test set: {len(cells)} distinct runs "
              f"({', '.join(p.objectives)}-tuned tables)", flush=True)
    run_cells(cells, p.jobs, progress=not p.quiet, force=p.force)

    tables = {}
    name = load_preset(p.preset).name
    for o in p.objectives:
        title = f"{name}, {o}-tuned ({p.trials} trials per rule)"
        res = summarize(folders[o], p.out / o, title=title,
                        reported=reported_predictions(presets[o], list(folders[o]), p.final_sets))
        tables[o] = {"md": str(res["md"]), "csv": str(res["csv"]), "plots": [str(x) for x in res["plots"]]}
    record["final-runs"] = {o: {k: [str(x) for x in v] for k, v in f.items()} for o, f in folders.items()}
    record["tables"] = tables
    record["status"] = "done"
    _write(p, record)
    _combined_table(p, record, chosen)
    return record


def _header(p: Protocol) -> dict[str, Any]:
    any_spec = next(iter(p.specs.values()))
    both = ("Both objectives come from one study per rule: every trial records val_accuracy and val_nll; the "
            "NLL-tuned setting is the best val_nll among the trials that pruning by accuracy let finish."
            if len(p.objectives) > 1 else "")
    return {
        "command": p.command, "status": "tuned", "preset": p.preset, "algorithms": p.algorithms, "seeds": p.seeds,
        "budget": {"trials-per-rule": p.trials, "rounds-per-trial": any_spec.rounds,
                   "final-rounds": int(p.final_sets.get("rounds") or resolve(
                       {**load_preset(p.preset).base, "algorithm": p.algorithms[0]}).run.rounds),
                   "validation-fraction": any_spec.base["validation-fraction"], "last-rounds": LAST_ROUNDS,
                   "jobs": p.jobs},
        "objectives": p.objectives, "study-objective": p.study_objective, "predictor": any_spec.predictor,
        "pruner": p.pruner,
        "pruning-rule": PRUNING_RULE.format(study=p.study_objective, pruner=p.pruner, both=both).strip(),
        "selection-rule": SELECTION_RULE.format(last=LAST_ROUNDS, n=p.trials),
        "final-sets": p.final_sets, "rules": {}, "notes": [],
    }


def _write(p: Protocol, record: dict[str, Any]) -> None:
    atomic_write_bytes(p.out / "protocol.json", (json.dumps(record, indent=1, default=str) + "\n").encode())


def _combined_table(p: Protocol, record: dict[str, Any], chosen: dict[str, dict[str, Any]]) -> Path:
    """``DIR/table.md``: the headline (accuracy-tuned) table, the NLL-tuned one, the chosen settings."""
    names = {"accuracy": "tuned for validation accuracy", "nll": "tuned for validation NLL"}
    lines = [f"# {p.preset}: every rule tuned with {p.trials} trials on the validation split, then tested", "",
             f"Budget: {p.trials} trials per rule × {record['budget']['rounds-per-trial']} rounds, pruner "
             f"{p.pruner}; final runs of {record['budget']['final-rounds']} rounds on the test set, seeds "
             f"{','.join(map(str, p.seeds))}. "
             f"{record['pruning-rule']} {record['selection-rule']}", ""]
    for i, o in enumerate(p.objectives):
        body = Path(record["tables"][o]["md"]).read_text().splitlines()
        body = [ln for ln in body if not ln.startswith("# ")]
        while body and not body[0].strip():
            body.pop(0)
        lines += [f"## {'Headline: ' if i == 0 else ''}{names[o]}", "", *body, ""]
    lines += ["## Chosen settings (validation, mean of the last 3 rounds)", "",
              "| rule | tuned for | trial | val accuracy | val NLL | values |", "|---|---|---|---|---|---|"]
    for o in p.objectives:
        for algo in p.algorithms:
            b = chosen[o].get(algo)
            if b is None:
                lines.append(f"| {algo} | {o} | – | – | – | preset's (no complete trial) |")
                continue
            acc = next((v for k, v in b.items() if k.endswith("val_accuracy")), math.nan)
            nll = next((v for k, v in b.items() if k.endswith("val_nll")), math.nan)
            vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items())
            lines.append(f"| {algo} | {o} | {b['trial']} | {acc:.4f} | {nll:.4f} | {vals} |")
    path = p.out / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ CLI
def cmd_compare_tune(args: Any) -> int:
    """``fedbayes compare --tune N …`` (the parser is in :mod:`fedbayes.cli`)."""
    import shlex
    import sys

    from fedbayes.config import parse_sets

    preset = load_preset(args.preset)
    algos = args.algorithms.split(",") if args.algorithms else list(preset.algorithms)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [int(preset.base.get("seed", 0))]
    out = Path(args.out or f"runs/compare-tune-{preset.name}")
    proto = make_protocol(args.preset, algos, args.tune, seeds, out, rounds=args.rounds,
                          tune_rounds=getattr(args, "tune_rounds", None), sets=parse_sets(args.set),
                          jobs=args.jobs, objective=args.objective or "both", pruner=args.pruner or DEFAULT_PRUNER,
                          centralized=not args.no_centralized, force=args.force, quiet=args.quiet,
                          command=["fedbayes", *getattr(args, "argv", [])])
    try:
        record = run_protocol(proto)
    except KeyboardInterrupt:
        again = shlex.join(proto.command)
        print(f"[fedbayes] interrupted: finished trials, finished runs and checkpoints are kept in {out}; continue "
              f"with the same command: {again}", file=sys.stderr)
        return 130
    print((out / "table.md").read_text())
    print(f"[fedbayes] {out / 'table.md'} (tables and chosen settings), per objective: "
          + ", ".join(t["md"] for t in record["tables"].values()) + f"; {out / 'protocol.json'}")
    for note in record["notes"]:
        print(f"[fedbayes] note: {note}")
    return 0
