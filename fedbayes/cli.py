"""The ``fedbayes`` command line: run, compare, evaluate, tune, tune-apply, algorithms, presets, keys, data, bench.

The command sits on top of everything: the library (``fedbayes.*``) and the experiment drivers of
``simulations/`` (presets, ``compare``, ``tune``, the what-if commands, benchmarks); nothing in the library imports
this module.  Building the parser imports no torch, flwr, optuna or matplotlib (``fedbayes --help`` takes a fraction
of a second instead of ~5 s): the closed sets of names (algorithms, datasets, models, partitions) come from
:mod:`fedbayes.names`, the presets from their folder, and every command imports the library when it runs.

Every configuration problem (unknown algorithm, dataset, model, preset or key; a ``--set`` of the wrong type
or out of range) is reported with what is valid and the closest names ("did you mean"), before any training starts,
with exit status 2.
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


def _flat_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str | None, str | None]:
    """The run's flat config, a line saying which preset it starts from (None: ``--config`` alone) and that
    preset's name (None: none).

    Without ``--config``: the preset (``--preset``, else the dataset's default preset, ``--preset none``: none),
    then the explicit options and ``--set`` on top.  ``--config FILE`` is a resolved run: no default preset
    (an explicit ``--preset`` still goes on top of the file, as before), then the options.
    """
    from fedbayes.config import load_config_file
    from fedbayes.presets import AUTO, apply_preset

    flat: dict[str, Any] = {}
    if args.config:
        flat.update(load_config_file(args.config))
    explicit = _explicit(args)
    if args.config and not args.preset:
        return {**flat, **explicit}, None, None
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
    return {**flat, **resolved}, line, used


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
                                     num_cpus=args.client_cpus, num_gpus=args.client_gpus, resume=True,
                                     verbose=args.verbose)
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
    flat, line, used = _flat_from_args(args)
    exp = resolve(flat)
    if line:
        print(line, flush=True)
    out = Path(args.out or f"runs/{exp.run.algorithm}-{exp.run.dataset}-s{exp.run.seed}")
    check_new_run(out, args.overwrite, flag="--overwrite")  # a run there: refused, or (--overwrite) removed
    try:
        if args.engine == "flower":
            from simulations.flower_engine import run_flower_simulation

            rows = run_flower_simulation(exp.to_flat(), out, num_supernodes=exp.run.num_clients,
                                         num_cpus=args.client_cpus, num_gpus=args.client_gpus, verbose=args.verbose,
                                         preset=used)
        else:
            rows = run_experiment(exp, out, progress=not args.quiet)
    except KeyboardInterrupt:
        return _interrupted(out)
    print(_summary(rows))
    print(f"[fedbayes] results in {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedbayes.config import ConfigError, parse_sets
    from fedbayes.presets import load_preset
    from simulations.compare import reported_predictions, run_grid, summarize

    if args.tune is not None:  # the whole protocol: tune every rule on validation, then test (docs/tuning.md)
        from simulations.tune.protocol import cmd_compare_tune

        return cmd_compare_tune(args)
    if args.objective or args.pruner or args.tune_rounds is not None:
        raise ConfigError("--objective, --pruner and --tune-rounds choose how --tune N tunes; add --tune N (trials "
                          "per rule)")
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


def cmd_presets(args: argparse.Namespace) -> int:
    from fedbayes.presets import preset_summaries

    rows = preset_summaries()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:{width}s} {r['dataset']:8s} {r['description']}")
        if args.long:
            print(f"{'':{width}s} {'':8s} algorithms: {r['algorithms'].replace(',', ', ')}; rounds: {r['rounds']}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Every config key a run of ``--algorithm`` accepts (``--set KEY=VALUE``, presets, config.json)."""
    from fedbayes.algorithms import get_algorithm
    from fedbayes.config import LOCAL_KEYS, RunConfig, RunKeys
    from fedbayes.keys import kebab

    def show(title: str, fields: dict[str, Any], names: list[str]) -> None:
        print(title)
        width = max(len(kebab(n)) for n in names)
        for n in names:
            default = fields[n].default
            shown = "the rule's default" if default is None and n in LOCAL_KEYS else json.dumps(default)
            print(f"  {kebab(n):{width}s}  {shown}")

    cls = get_algorithm(args.algorithm)
    show("run keys (data, model, clients, rounds, evaluation; every algorithm):", RunConfig.model_fields,
         list(RunKeys.model_fields))
    show("local-training keys (every algorithm; unset: the rule's default):", RunConfig.model_fields,
         list(LOCAL_KEYS))
    show(f"{args.algorithm} keys (its hyperparameters, named as in its paper; `fedbayes algorithms` for the others):",
         cls.Config.model_fields, list(cls.Config.model_fields))
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


BENCH_NAMES = ("ivon", "engine", "flower", "whatif", "scale", "cnn")
"""``fedbayes bench NAME``: :data:`simulations.bench.BENCHES` and the three with their own options (a test keeps the
list equal to them; listed here so that building the parser imports no torch)."""
OWN_OPTIONS = {"whatif": "simulations.bench_whatif", "scale": "simulations.bench_scale",
               "engine": "simulations.bench_engine", "cnn": "simulations.bench_cnn"}
"""Benchmarks that parse their own options (``fedbayes bench NAME --help``): NAME -> module with ``main(argv)``."""


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark.  ``--out`` may come before or after NAME (``bench ivon --out DIR``, as the Makefile
    writes it): argparse puts everything after NAME into the benchmark's own options, so ``ivon`` and ``flower``
    read ``--out`` from there and reject anything else."""
    import importlib

    if args.name in OWN_OPTIONS:
        options = list(args.options)
        if "--out" not in options:
            options += ["--out", args.out if args.out != "runs/bench" else f"runs/bench/{args.name}"]
        return int(importlib.import_module(OWN_OPTIONS[args.name]).main(options))
    own = argparse.ArgumentParser(prog=f"fedbayes bench {args.name}",
                                  description=f"benchmark {args.name}: its only option is --out")
    own.add_argument("--out", default=args.out, help="folder for bench-NAME.json (default: %(default)s)")
    out = own.parse_args(args.options).out
    from simulations.bench import BENCHES

    res = BENCHES[args.name](Path(out))  # type: ignore[operator]
    print(json.dumps(res, indent=1))
    return 0


def _preset_type(extra: tuple[str, ...] = ()) -> Any:
    """``--preset``: a built-in preset's name (a typo gets the closest names), one of ``extra`` (``none``), or a
    path to a TOML file (checked when it is loaded)."""
    from fedbayes.presets import preset_names, unknown_preset

    names = set(preset_names()) | set(extra)

    def preset(value: str) -> str:
        if value in names or Path(value).suffix:
            return value
        raise argparse.ArgumentTypeError(unknown_preset(value))

    return preset


def _algorithm_list(value: str) -> str:
    """``--algorithms a,b``: each name checked (with the closest names for a typo); the string is kept."""
    from fedbayes.names import ALGORITHMS, unknown

    for name in value.split(","):
        if name not in ALGORITHMS:
            raise argparse.ArgumentTypeError(unknown("algorithm", name, ALGORITHMS))
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``fedbayes`` parser.  Building it imports no torch, flwr, optuna or matplotlib (``fedbayes --help`` in a
    fraction of a second; ``tests/test_cli_ux.py`` checks it): choices come from :mod:`fedbayes.names` and the
    preset folder, and each command imports what it needs when it runs."""
    from fedbayes import __version__
    from fedbayes.names import ALGORITHMS, DATASETS, MODELS, PARTITIONS, choice
    from fedbayes.presets import DATASET_PRESETS, preset_names

    presets = ", ".join(preset_names())
    p = argparse.ArgumentParser(prog="fedbayes", description="Federated variational-Bayes ADMM with IVON clients. "
                                "`fedbayes COMMAND --help` describes a command's options.")
    p.add_argument("--version", action="version", version=f"fedbayes {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (rounds, dropped replies, …)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_set(parser: argparse.ArgumentParser, what: str) -> None:
        parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help=f"any config key {what} (repeatable); `fedbayes keys --algorithm A` lists them")

    r = sub.add_parser(
        "run", help="run one experiment and write its results folder",
        description="Run one experiment. Without --preset (and without --config) the run starts from its dataset's "
                    f"default preset ({', '.join(f'{d}: {n}' for d, n in DATASET_PRESETS.items())}; other datasets: "
                    "the code's defaults), then the options below and --set override it. The first line printed "
                    "names the preset; config.json holds every resolved value.")
    r.add_argument("--algorithm", type=choice("algorithm", ALGORITHMS), choices=ALGORITHMS, metavar="ALGORITHM",
                   help="the server rule: %(choices)s (default: the preset's, else bayes-admm)")
    r.add_argument("--dataset", type=choice("dataset", DATASETS), choices=DATASETS, metavar="DATASET",
                   help="%(choices)s (default: the preset's, else digits)")
    r.add_argument("--model", type=choice("model", MODELS), choices=MODELS, metavar="MODEL",
                   help="%(choices)s (default: the preset's, else mlp)")
    r.add_argument("--clients", type=int, metavar="K", help="number of clients K (run key num-clients)")
    r.add_argument("--partition", type=choice("partition", PARTITIONS), choices=PARTITIONS, metavar="PARTITION",
                   help="how the training data is split over the clients: %(choices)s")
    r.add_argument("--rounds", type=int, help="federated rounds (with --resume: the total to reach)")
    r.add_argument("--seed", type=int, help="seed of the data split, initialisation and training")
    r.add_argument("--preset", type=_preset_type(("none",)),
                   help=f"a preset name ({presets}) or TOML file to start from (default: the dataset's preset; "
                        "'none': the code's defaults); `fedbayes presets` describes them")
    r.add_argument("--config", help="a config.json of an earlier run (reproduces it; no default preset)")
    add_set(r, "(run keys and the algorithm's)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto: cuda if available)")
    r.add_argument("--engine", choices=["inprocess", "sequential", "batched", "flower"], default="inprocess",
                   help="inprocess (clients batched on a GPU, sequential on a CPU: run key client-engine = auto), "
                   "sequential or batched (in process, clients one after another or all at once), or flower "
                   "(Flower's simulation runtime)")
    r.add_argument("--client-cpus", type=float, default=1.0, help="flower engine: CPUs per ClientApp")
    r.add_argument("--client-gpus", type=float, default=0.0, help="flower engine: GPU fraction per ClientApp")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    r.add_argument("--out", metavar="DIR", help="the results folder (default runs/ALGORITHM-DATASET-sSEED)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (default: refused; --resume continues it)")
    r.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("compare", help="run a preset's algorithms × seeds and write tables and plots",
                       description="Run a preset's algorithms × seeds (and the pooled-data rows centralized and "
                                   "centralized-ivon), then write table.md, table.csv and accuracy/NLL plots. "
                                   "Finished runs in the output folder with the same settings are reused, "
                                   "unfinished ones continued; runs made with other settings are refused unless "
                                   "--force.")
    c.add_argument("--preset", required=True, type=_preset_type(),
                   help=f"a preset name ({presets}) or TOML file; `fedbayes presets` describes them")
    c.add_argument("--algorithms", type=_algorithm_list, metavar="A[,A…]",
                   help=f"comma-separated, of {', '.join(ALGORITHMS)} (default: the preset's)")
    c.add_argument("--seeds", metavar="S[,S…]", help="comma-separated, e.g. 0,1,2 (default: the preset's seed)")
    c.add_argument("--rounds", type=int, help="rounds of every run (default: the preset's)")
    add_set(c, "for every run")
    c.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one torch thread each)")
    c.add_argument("--no-centralized", action="store_true", help="leave out the pooled-data rows")
    c.add_argument("--out", metavar="DIR", help="the comparison folder (default runs/compare-PRESET)")
    c.add_argument("--force", action="store_true",
                   help="rerun the runs in --out made with other settings (default: refused, naming the keys)")
    c.add_argument("--tune", type=int, metavar="N",
                   help="first tune every rule with N trials on the validation split (studies in OUT/tune/RULE), "
                        "then run each rule's best setting on the test set: tables per objective, protocol.json")
    c.add_argument("--objective", choices=["both", "accuracy", "nll"],
                   help="with --tune: both (default; one study per rule, pruned by accuracy, both tables), "
                        "accuracy or nll")
    c.add_argument("--pruner", choices=["hyperband", "halving", "median", "none"],
                   help="with --tune: how trials stop early over rounds (default hyperband)")
    c.add_argument("--tune-rounds", type=int, metavar="R",
                   help="with --tune: rounds of each trial (default: the final runs' rounds); fewer rounds afford "
                        "more trials, at the cost of choosing for R rounds (docs/tuning.md)")
    c.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    c.set_defaults(fn=cmd_compare)

    a = sub.add_parser("algorithms", help="list the registered algorithms and their keys")
    a.set_defaults(fn=cmd_algorithms)

    ps = sub.add_parser("presets", help="list the presets: name, dataset, description")
    ps.add_argument("--long", action="store_true", help="also each preset's algorithms and rounds")
    ps.set_defaults(fn=cmd_presets)

    k = sub.add_parser("keys", help="list every config key (run keys and an algorithm's) with its default")
    k.add_argument("--algorithm", type=choice("algorithm", ALGORITHMS), choices=ALGORITHMS, metavar="ALGORITHM",
                   default="bayes-admm", help="whose hyperparameters to list: %(choices)s (default: %(default)s)")
    k.set_defaults(fn=cmd_keys)

    d = sub.add_parser("data", help="obtain and cache datasets (offline sources, SHA-256 checked)")
    d.add_argument("action", choices=["fetch", "list"], help="fetch: obtain and cache; list: print the names")
    d.add_argument("name", nargs="?", default="all", type=choice("dataset", DATASETS, also=("all",)),
                   choices=(*DATASETS, "all"), metavar="NAME",
                   help="a dataset (%(choices)s; default: all)")
    d.add_argument("--force", action="store_true", help="fetch again even if cached")
    d.set_defaults(fn=cmd_data)

    b = sub.add_parser("bench", help="benchmarks; results written as JSON")
    b.add_argument("name", type=choice("benchmark", BENCH_NAMES), choices=BENCH_NAMES, metavar="NAME",
                   help="%(choices)s (`fedbayes bench whatif --help`, `… scale --help`, `… engine --help` for "
                        "their options)")
    b.add_argument("--out", default="runs/bench", help="results folder (default: %(default)s)")
    b.add_argument("options", nargs=argparse.REMAINDER,
                   help="the benchmark's own options (whatif, scale, engine; --out for every one)")
    b.set_defaults(fn=cmd_bench)

    from simulations.whatif_cli import add_subparsers as add_whatif

    add_whatif(sub)  # whatif, influence, forget, merge (answers from the stored sites, no retraining)

    from simulations.evaluate import add_subparsers as add_evaluate

    add_evaluate(sub)  # evaluate: a finished run's posterior with other prediction settings (no retraining)

    from simulations.tune import add_subparsers as add_tune

    add_tune(sub)  # tune, tune-apply (Optuna studies on a validation split)
    return p


BENCH_EXTRA = {"optuna": "tuning", "matplotlib": "plots"}
"""Packages of the ``bench`` extra (``pip install 'fedbayes[bench]'``): ``tune`` needs optuna, ``compare`` and
``tune`` plot with matplotlib.  The library, ``fedbayes.flower`` and a ClientApp never import them."""


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit status (0; 2 for bad input, also argparse's: nothing raises SystemExit;
    130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and argparse's usage errors (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from fedbayes.config import ConfigError

    try:
        return int(args.fn(args))
    except (ConfigError, ValueError) as e:
        print(f"fedbayes: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a command's own option parser (bench NAME OPTIONS): message already printed
        return e.code if isinstance(e.code, int) else 2
    except ModuleNotFoundError as e:
        extra = BENCH_EXTRA.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"fedbayes: error: this command needs {e.name} ({extra}), which is not installed: "
              "pip install 'fedbayes[bench]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's rounds (run and compare say how to continue themselves)
        print("[fedbayes] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
