"""``fedbayes tune`` and ``fedbayes tune-apply``: the command-line front end of :mod:`simulations.tune`."""

from __future__ import annotations

import argparse
from typing import Any

from fedbayes.names import ALGORITHMS, choice
from fedbayes.presets import preset_names

OBJECTIVE_NAMES = ("accuracy", "nll")
"""``--objective`` choices: the keys of :data:`simulations.tune.spec.OBJECTIVES` (a test keeps them equal), listed here
so that building the parser imports neither torch nor Optuna."""
PRUNER_NAMES = ("median", "hyperband", "halving", "none")
"""``--pruner`` choices: :data:`simulations.tune.spec.PRUNERS` (a test keeps them equal)."""


# ------------------------------------------------------------------------------------------------ CLI
def cmd_tune(args: argparse.Namespace) -> int:
    from fedbayes.config import parse_sets
    from simulations.tune.spec import make_spec
    from simulations.tune.study import tune

    spec = make_spec(
        args.preset, args.algorithm, args.trials, rounds=args.rounds, jobs=args.jobs, seed=args.seed, out=args.out,
        storage=args.storage, sets=parse_sets(args.set), objective=args.objective, predictor=args.predictor,
        quiet=args.quiet, pruner=args.pruner,
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
    from simulations.tune.outputs import apply_best

    path = apply_best(args.dirs, args.preset, args.out)
    print(f"[tune] tuned preset written to {path}; run it with `fedbayes compare --preset {path}`")
    return 0


def add_subparsers(sub: Any) -> None:
    """``tune`` and ``tune-apply`` on the ``fedbayes`` command."""
    t = sub.add_parser("tune", help="tune an algorithm's hyperparameters on a validation split (Optuna TPE)")
    t.add_argument("--preset", required=True,
                   help=f"the preset whose config is tuned: a name ({', '.join(preset_names())}) or a TOML file")
    t.add_argument("--algorithm", required=True, type=choice("algorithm", ALGORITHMS), choices=ALGORITHMS,
                   metavar="ALGORITHM",
                   help="the algorithm to tune: %(choices)s")
    t.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    t.add_argument("--rounds", type=int, help="rounds per trial (default: the preset's)")
    t.add_argument("--jobs", type=int, default=1, help="trials in parallel (processes sharing the storage)")
    t.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (the runs use the preset's seed)")
    t.add_argument("--out", help="study folder (default runs/tune/PRESET/ALGORITHM)")
    t.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key for every trial")
    t.add_argument("--objective", choices=OBJECTIVE_NAMES, default="nll",
                   help="nll: minimise validation NLL; accuracy: maximise validation accuracy (last 3 rounds)")
    t.add_argument("--predictor", choices=["mean", "bma"], default="mean",
                   help="score the global mean's prediction or (Bayesian rules) the posterior average")
    t.add_argument("--pruner", choices=PRUNER_NAMES, default="median",
                   help="which trials stop early, judged per round: median (default), hyperband or halving "
                        "(multi-fidelity over rounds), none")
    t.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    t.set_defaults(fn=cmd_tune)

    a = sub.add_parser("tune-apply", help="merge best.toml files of tune studies into a copy of a preset")
    a.add_argument("dirs", nargs="+", metavar="DIR", help="study folders (or best.toml files)")
    a.add_argument("--preset", required=True, help="the preset the studies tuned (its copy gets the tuned tables)")
    a.add_argument("--out", required=True, help="the tuned preset to write (a .toml path)")
    a.set_defaults(fn=cmd_tune_apply)
