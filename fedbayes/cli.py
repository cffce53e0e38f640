"""The ``fedbayes`` command line: run, compare, evaluate, tune, tune-apply, algorithms, data fetch, bench.

The command sits on top of everything: the library (``fedbayes.*``) and the experiment drivers of
``simulations/`` (presets, ``compare``, ``tune``, the what-if commands, benchmarks), which it imports when it
builds its parser; nothing in the library imports this module.

Every configuration problem (unknown algorithm, dataset, model, preset or key; a ``--set`` of the wrong type
or out of range) is reported with what is valid, before any training starts, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the command line sets explicitly (options and ``--set``), without any preset."""
    from fedbayes.config import parse_sets

    explicit: dict[str, Any] = {}
    for key, val in (("algorithm", args.algorithm), ("dataset", args.dataset), ("model", args.model),
                     ("num-clients", args.clients), ("partition", args.partition), ("rounds", args.rounds),
                     ("seed", args.seed), ("device", args.device)):
        if val is not None:
            explicit[key] = val
    if getattr(args, "engine", None) in ("sequential", "batched"):  # the in-process engine's client path
        explicit["client-engine"] = args.engine
    explicit.update(parse_sets(args.set))
    return explicit


def _flat_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The run's flat config and a line saying which preset it starts from (None: ``--config`` alone).

    Without ``--config``: the preset (``--preset``, else the dataset's default preset, ``--preset none``: none),
    then the explicit options and ``--set`` on top.  ``--config FILE`` is a resolved run: no default preset
    (an explicit ``--preset`` still goes on top of the file, as before), then the options.
    """
    from fedbayes.config import load_config_file
    from simulations.presets import AUTO, apply_preset

    flat: dict[str, Any] = {}
    if args.config:
        flat.update(load_config_file(args.config))
    explicit = _explicit(args)
    if args.config and not args.preset:
        return {**flat, **explicit}, None
    if "algorithm" in flat and "algorithm" not in explicit:
        explicit = {"algorithm": flat["algorithm"], **explicit}
    resolved, used = apply_preset(explicit, args.preset or AUTO)
    if used is not None:
        how = "" if args.preset else (f" (the default for dataset {resolved.get('dataset')}; options and --set "
                                      "override it; --preset none: the code's defaults)")
        line = f"[fedbayes] preset: {used}{how}"
    elif args.preset:
        line = "[fedbayes] preset: none (the code's defaults)"
    else:
        dataset = explicit.get("dataset", "digits")
        line = f"[fedbayes] preset: none (dataset {dataset} has no default preset: the code's defaults)"
    return {**flat, **resolved}, line


def _summary(rows: list[dict[str, Any]]) -> str:
    """The last round's test (or validation) metrics on one line: what ``run`` prints at the end."""
    last = rows[-1]
    keys = [k for k in last if k.startswith(("test_", "bma_test_", "val_", "bma_val_"))]
    return " ".join(f"{k}={last[k]:.4f}" for k in keys)


def _interrupted(out: Path) -> int:
    """Ctrl-C during ``run``: say which round the checkpoint holds and how to continue; exit status 130."""
    try:
        meta = json.loads((out / "checkpoint" / "meta.json").read_text())
        done, total = int(meta["round"]), int(meta["config"]["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"[fedbayes] interrupted before the first checkpoint: nothing to continue in {out}; start again with "
              "the same command and --overwrite", file=sys.stderr)
        return 130
    print(f"[fedbayes] interrupted: the checkpoint in {out} holds round {done} of {total}; continue with: "
          f"fedbayes run --resume {shlex.quote(str(out))}", file=sys.stderr)
    return 130


def _resume(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``run --resume DIR``: the checkpoint's config is the run; an explicit option or ``--set`` that differs from
    it is refused (:func:`fedbayes.resume.load_resume`; only :data:`fedbayes.resume.MAY_CHANGE` may change)."""
    from fedbayes.config import ConfigError, resolve
    from fedbayes.engine import run_experiment
    from fedbayes.resume import MAY_CHANGE, load_resume, refuse_changes

    folder = Path(args.resume)
    explicit = _explicit(args)
    sets = "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in explicit.items())
    new = f"fedbayes run --config {shlex.quote(str(folder / 'config.json'))}{sets} --out NEW"
    if args.config or args.preset:
        raise ConfigError(f"--resume continues the run in {folder} with its own config; --config and --preset start "
                          f"a new run. To start a new run from that run's config: {new}")
    if args.out and Path(args.out).resolve() != folder.resolve():
        raise ConfigError(f"--resume continues the run in {folder} and writes there; --out {args.out} is not used. "
                          f"Drop --out, or to start a new run from that run's config: {new}")
    have = load_resume(folder).exp.to_flat()  # a damaged checkpoint: CheckpointError, nothing written
    advice = (f"--resume continues the run as it was made (only {list(MAY_CHANGE)} may change): drop those options "
              f"to continue it, or start a new run from its config: {new}")
    try:
        want = resolve({**have, **explicit})
    except ConfigError:  # e.g. another algorithm (the checkpoint's algorithm keys do not fit it): name the options
        refuse_changes(folder, {**have, **{k: v for k, v in explicit.items() if str(v) != str(have.get(k))}}, have,
                       advice)
        raise
    cont = load_resume(folder, want, advice=advice)
    if args.engine == "flower":
        from simulations.flower_engine import run_flower_simulation

        saved = cont.exp.to_flat()
        return run_flower_simulation(saved, folder, num_supernodes=int(saved["num-clients"]),
                                     num_cpus=args.client_cpus, num_gpus=args.client_gpus, resume=True)
    return run_experiment({"rounds": cont.exp.run.rounds}, folder, resume=True, progress=not args.quiet)


def cmd_run(args: argparse.Namespace) -> int:
    from fedbayes.config import resolve
    from fedbayes.engine import run_experiment
    from fedbayes.results import check_new_run

    if args.resume:
        try:
            rows = _resume(args)
        except KeyboardInterrupt:
            return _interrupted(Path(args.resume))
        print(_summary(rows))
        print(f"[fedbayes] resumed run in {args.resume}")
        return 0
    flat, line = _flat_from_args(args)
    exp = resolve(flat)
    if line:
        print(line, flush=True)
    out = Path(args.out or f"runs/{exp.run.algorithm}-{exp.run.dataset}-s{exp.run.seed}")
    check_new_run(out, args.overwrite, flag="--overwrite")  # a run there: refused, or (--overwrite) removed
    try:
        if args.engine == "flower":
            from simulations.flower_engine import run_flower_simulation

            rows = run_flower_simulation(exp.to_flat(), out, num_supernodes=exp.run.num_clients,
                                         num_cpus=args.client_cpus, num_gpus=args.client_gpus)
        else:
            rows = run_experiment(exp, out, progress=not args.quiet)
    except KeyboardInterrupt:
        return _interrupted(out)
    print(_summary(rows))
    print(f"[fedbayes] results in {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedbayes.config import parse_sets
    from simulations.compare import reported_predictions, run_grid, summarize
    from simulations.presets import load_preset

    preset = load_preset(args.preset)
    algos = args.algorithms.split(",") if args.algorithms else list(preset.algorithms)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [int(preset.base.get("seed", 0))]
    sets = parse_sets(args.set)
    if args.rounds:
        sets["rounds"] = args.rounds
    out = Path(args.out or f"runs/compare-{preset.name}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        folders = run_grid(preset, algos, seeds, out, sets=sets, jobs=args.jobs,
                           centralized=not args.no_centralized, progress=not args.quiet, force=args.force)
    except KeyboardInterrupt:
        again = shlex.join(["fedbayes", *getattr(args, "argv", [])])
        print(f"[fedbayes] interrupted: finished runs and the others' checkpoints are kept in {out}; continue with "
              f"the same command: {again}", file=sys.stderr)
        return 130
    res = summarize(folders, out, title=f"{preset.name}: {preset.description}",
                    reported=reported_predictions(preset, list(folders), sets))
    print(Path(res["md"]).read_text())
    print(f"[fedbayes] table: {res['md']} and {res['csv']}; plots: {', '.join(str(p) for p in res['plots'])}")
    return 0


def cmd_algorithms(args: argparse.Namespace) -> int:
    from fedbayes.algorithms import REGISTRY
    from fedbayes.keys import kebab

    for name, cls in REGISTRY.items():
        kind = "bayesian" if cls.bayesian else "point"
        keys = ", ".join(kebab(k) for k in cls.Config.model_fields)
        print(f"{name:12s} {kind:9s} {cls.summary}  [keys: {keys}]")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fedbayes.data import dataset_names, fetch

    if args.action == "list":
        for n in dataset_names():
            print(n)
        return 0
    names = dataset_names() if args.name == "all" else [args.name]
    for n in names:
        if n not in dataset_names():
            raise ValueError(f"unknown dataset '{n}'; valid: {dataset_names()} or 'all'")
        fetch(n, force=args.force)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import BENCHES

    if args.name == "whatif":
        from simulations.bench_whatif import main as bench_whatif

        options = list(args.options)
        if "--out" not in options:
            options += ["--out", args.out if args.out != "runs/bench" else "runs/bench/whatif"]
        return bench_whatif(options)
    if args.name == "scale":
        from simulations.bench_scale import main as bench_scale

        options = list(args.options)
        if "--out" not in options:
            options += ["--out", args.out if args.out != "runs/bench" else "runs/bench/scale"]
        return bench_scale(options)
    if args.name == "engine":
        from simulations.bench_engine import main as bench_engine

        options = list(args.options)
        if "--out" not in options:
            options += ["--out", args.out if args.out != "runs/bench" else "runs/bench/engine"]
        return bench_engine(options)
    if args.options:
        raise ValueError(f"benchmark '{args.name}' takes no options (got {args.options})")
    if args.name not in BENCHES:
        raise ValueError(f"unknown benchmark '{args.name}'; valid: {sorted(BENCHES)}")
    res = BENCHES[args.name](Path(args.out))  # type: ignore[operator]
    print(json.dumps(res, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbayes", description="Federated variational-Bayes ADMM with IVON clients")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    from simulations.presets import DATASET_PRESETS

    r = sub.add_parser(
        "run", help="run one experiment and write its results folder",
        description="Run one experiment. Without --preset (and without --config) the run starts from its dataset's "
                    f"default preset ({', '.join(f'{d}: {n}' for d, n in DATASET_PRESETS.items())}; other datasets: "
                    "the code's defaults), then the options below and --set override it. The first line printed "
                    "names the preset; config.json holds every resolved value.")
    r.add_argument("--algorithm")
    r.add_argument("--dataset")
    r.add_argument("--model")
    r.add_argument("--clients", type=int)
    r.add_argument("--partition")
    r.add_argument("--rounds", type=int)
    r.add_argument("--seed", type=int)
    r.add_argument("--preset", help="a preset name or TOML file to start from (default: the dataset's preset; "
                                    "'none': the code's defaults)")
    r.add_argument("--config", help="a config.json of an earlier run (reproduces it; no default preset)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"])
    r.add_argument("--engine", choices=["inprocess", "sequential", "batched", "flower"], default="inprocess",
                   help="inprocess (clients batched on a GPU, sequential on a CPU: run key client-engine = auto), "
                   "sequential or batched (in process, clients one after another or all at once), or flower "
                   "(Flower's simulation runtime)")
    r.add_argument("--client-cpus", type=float, default=1.0, help="flower engine: CPUs per ClientApp")
    r.add_argument("--client-gpus", type=float, default=0.0, help="flower engine: GPU fraction per ClientApp")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    r.add_argument("--out")
    r.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refused)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("compare", help="run a preset's algorithms × seeds and write tables and plots")
    c.add_argument("--preset", required=True)
    c.add_argument("--algorithms", help="comma-separated (default: the preset's)")
    c.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    c.add_argument("--rounds", type=int)
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    c.add_argument("--no-centralized", action="store_true")
    c.add_argument("--out")
    c.add_argument("--force", action="store_true",
                   help="rerun the runs in --out made with other settings (default: refused, naming the keys)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_compare)

    a = sub.add_parser("algorithms", help="list the registered algorithms")
    a.set_defaults(fn=cmd_algorithms)

    d = sub.add_parser("data", help="obtain and cache datasets (offline sources, SHA-256 checked)")
    d.add_argument("action", choices=["fetch", "list"])
    d.add_argument("name", nargs="?", default="all")
    d.add_argument("--force", action="store_true")
    d.set_defaults(fn=cmd_data)

    b = sub.add_parser("bench", help="benchmarks; results written as JSON")
    b.add_argument("name", help="ivon | engine | flower | whatif | scale (`fedbayes bench whatif --help`, "
                   "`fedbayes bench scale --help` for their options)")
    b.add_argument("--out", default="runs/bench")
    b.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (whatif, scale)")
    b.set_defaults(fn=cmd_bench)

    from simulations.whatif_cli import add_subparsers as add_whatif

    add_whatif(sub)  # whatif, influence, forget, merge (answers from the stored sites, no retraining)

    from simulations.evaluate import add_subparsers as add_evaluate

    add_evaluate(sub)  # evaluate: a finished run's posterior with other prediction settings (no retraining)

    from simulations.tune import add_subparsers as add_tune

    add_tune(sub)  # tune, tune-apply (Optuna studies on a validation split)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from fedbayes.config import ConfigError

    try:
        return int(args.fn(args))
    except (ConfigError, ValueError) as e:
        print(f"fedbayes: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's rounds (run and compare say how to continue themselves)
        print("[fedbayes] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
