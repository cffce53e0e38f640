"""``fedbayes whatif | influence | forget | merge``: client removal, influence, unlearning and merging of runs.

Library: :mod:`fedbayes.whatif` (formulas, assumptions).  Register the commands in ``fedbayes/cli.py`` with
``whatif_cli.add_subparsers(sub)``; each parser sets ``fn`` to a function taking the parsed arguments and
returning an exit status, like the other commands.  :func:`main` runs them stand-alone
(``python -m simulations.whatif_cli influence runs/pvi``).

Every command reads its source run(s) only and writes one **new** folder: it is assembled in a temporary
sibling and moved into place at the end, so an invalid request (unknown client, point algorithm, improper
posterior without fallback, mismatched runs, an existing output folder) leaves the disk unchanged.

The commands import the library (torch) when they run, not when their parsers are built (``fedbayes --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedbayes.whatif import LoadedRun

__all__ = ["add_subparsers", "cmd_forget", "cmd_influence", "cmd_merge", "cmd_whatif", "main"]



@contextmanager
def _new_output(out: Path, sources: Sequence[Path]) -> Iterator[Path]:
    """Yield a staging folder that becomes ``out`` on success and disappears on failure."""
    from fedbayes.whatif import new_folder, publish, staging

    new_folder(out, sources)
    created = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    tmp = staging(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents made for the output only
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise
    publish(tmp, out)


def _print_note(note: dict[str, Any]) -> None:
    """The reliability note (:mod:`fedbayes.whatif.reliability`), the removal's facts first where it has them."""
    from fedbayes.whatif.reliability import describe_note

    rem = note.get("removal")
    if rem:
        print(f"[fedbayes] removed {rem['removed_examples_share']:.1%} of the examples; the '{rem['estimator']}' "
              f"contributions: {rem['removed_precision_share']:.2%} of the global's data precision for them, "
              f"{rem['coverage']:.1%} for all clients")
    for line in describe_note(note):
        print(line)


def _summary_line(name: str, m: dict[str, float]) -> str:
    from simulations.whatif_report import SHOWN

    return f"{name}: " + " ".join(f"{k}={m[k]:.4f}" for k in SHOWN if k in m)


# ============================================================================================ whatif
def cmd_whatif(args: argparse.Namespace) -> int:
    from fedbayes.whatif import load_run, parse_clients, retrain_without, whatif, write_json, write_posterior_file
    from fedbayes.whatif.ops import eval_subset
    from simulations.whatif_report import SHOWN, fmt, plot_answer

    src = Path(args.dir)
    clients = parse_clients(args.remove)
    run = load_run(src)
    run.slots(clients)  # validate before anything is written
    out = Path(args.out) if args.out else src.parent / f"{src.name}-without-{'-'.join(map(str, clients))}"
    if args.verify and args.eval == "none":
        raise ValueError("--verify compares metrics: it needs --eval full or subset")
    with _new_output(out, [src]) as tmp:
        ans = whatif(run, clients, estimator=args.estimator, fallback=not args.no_fallback,
                     refine_rounds=args.refine, evaluate=args.eval, refine_from=args.refine_from)
        report = ans.report
        write_posterior_file(tmp / "posterior.safetensors", ans.posterior, run.rule.config.min_prec)
        if args.verify:
            keep = tmp / "retrain" if args.keep_retrain else None
            metrics, _post, seconds = retrain_without(run, clients, keep, progress=not args.quiet,
                                                      subset=eval_subset(args.eval))
            actual = {k: metrics[k] - report["full"][k] for k in metrics if k in report["full"]}
            report["verify"] = {
                "retrained": metrics,
                "actual_change": actual,
                "error": {k: report["predicted_change"][k] - actual[k] for k in actual
                          if k in report["predicted_change"]},
                "retrain_s": seconds,
                "speedup": seconds / max(report["seconds"]["answer"], 1e-12),
            }
        write_json(tmp / "answer.json", report)
        if args.eval != "none":
            plot_answer(tmp / "answer.png", report)
    step = report["step_back"]
    print(f"[fedbayes] {report['algorithm']}: removed client(s) {clients} "
          f"({report['removed_examples']} examples) with estimator '{report['estimator']}'"
          + (f", then {args.refine} round(s) of {report['algorithm']} without them" if args.refine else ""))
    _print_note(report["reliability"])
    if step["damped"]:
        print(f"[fedbayes] note: {report['validity']['fallback']}")
    if args.eval != "none":
        print(_summary_line("trained ", report["full"]))
        print(_summary_line("what-if ", report["whatif"]))
        print("predicted change: " + " ".join(f"{k}={fmt(report['predicted_change'][k])}" for k in SHOWN
                                               if k in report["predicted_change"]))
    print(f"KL(q ‖ q₋S) = {report['kl_full_to_whatif']:.4g} nats; answer in {report['seconds']['answer']:.3f} s"
          + (f" ({report['refine']['bytes'] / 1e6:.1f} MB of messages)" if args.refine else ""))
    if "verify" in report:
        ver = report["verify"]
        print(_summary_line("retrained", ver["retrained"]))
        print("actual change:    " + " ".join(f"{k}={fmt(ver['actual_change'][k])}" for k in SHOWN
                                             if k in ver["actual_change"]))
        print(f"retraining took {ver['retrain_s']:.1f} s ({ver['speedup']:.0f}× the what-if answer)")
    print(f"[fedbayes] what-if posterior and metrics in {out}")
    return 0


# ============================================================================================ influence
def cmd_influence(args: argparse.Namespace) -> int:
    src = Path(args.dir)
    out = Path(args.out) if args.out else src.parent / f"{src.name}-influence"
    from fedbayes.whatif import load_run
    from simulations.whatif_report import run_influence

    run = load_run(src)  # fails (unsupported algorithm, missing checkpoint) before any folder exists
    with _new_output(out, [src]) as tmp:
        run_influence(run, tmp, verify=args.verify, estimator=args.estimator, fallback=not args.no_fallback,
                      keep_retrains=args.keep_retrains, progress=not args.quiet, refine_rounds=args.refine,
                      evaluate=args.eval)
    print((out / "influence.md").read_text())
    _print_note(json.loads((out / "influence.json").read_text())["reliability"])
    print(f"[fedbayes] influence.md, influence.csv, influence.png{', scatter.png' if args.verify else ''} in {out}")
    return 0


# ============================================================================================ forget
def cmd_forget(args: argparse.Namespace) -> int:
    from fedbayes.whatif import forget, load_run, parse_clients

    src, out = Path(args.dir), Path(args.out)
    clients = parse_clients(args.remove)
    run = load_run(src)
    run.slots(clients)
    with _new_output(out, [src]) as tmp:
        info = forget(run, clients, tmp, estimator=args.estimator, fallback=not args.no_fallback, name=out)
    v = info["validity"]
    _print_note(info["reliability"])
    if not v["ok"]:
        print(f"[fedbayes] WARNING: {v['total_broken']} entries had precision <= {v['floor']:g}; {v['fallback']}")
    print(_summary_line("after forgetting", info["whatif"]))
    print(f"[fedbayes] run without client(s) {clients} in {out} (round {info['round']}, clients "
          f"{info['active_clients']}); continue with: {info['resume']}")
    return 0


# ============================================================================================ merge
def cmd_merge(args: argparse.Namespace) -> int:
    from fedbayes.whatif import kl_diag, load_run, merge, write_json, write_posterior_file
    from fedbayes.whatif.reliability import merge_note

    a_dir, b_dir, out = Path(args.dir_a), Path(args.dir_b), Path(args.out)
    a, b = load_run(a_dir), load_run(b_dir)
    merged, validity, notes = merge(a, b, fallback=not args.no_fallback)
    c = None
    if args.union:
        c = load_run(Path(args.union))
        notes += _check_union(a, b, c)
    sources = [a_dir, b_dir] + ([Path(args.union)] if args.union else [])
    with _new_output(out, sources) as tmp:
        floor = a.rule.config.min_prec
        report: dict[str, Any] = {
            "a": str(a_dir), "b": str(b_dir), "formula": "λ = λ_A + λ_B − λ₀",
            "clients": {"a": a.active, "b": b.active}, "notes": notes, "validity": validity.to_dict(),
            "metrics": {"a": a.full_metrics(), "b": b.full_metrics(), "merged": a.evaluate(merged)},
            "reliability": merge_note(a, b),
        }
        if c is not None:
            cm = a.evaluate(c.posterior())
            report["union"] = {
                "dir": str(args.union), "clients": c.active, "metrics": cm,
                "merged_minus_union": {k: report["metrics"]["merged"][k] - cm[k] for k in cm
                                       if k in report["metrics"]["merged"]},
                "kl_union_to_merged": kl_diag(c.rule.floor(c.posterior()), merged.clamp_prec(floor)),
            }
        write_posterior_file(tmp / "posterior.safetensors", merged, floor)
        write_json(tmp / "metrics.json", report)
    for n in notes:
        print(f"[fedbayes] note: {n}")
    _print_note(report["reliability"])
    if not validity.ok:
        print(f"[fedbayes] WARNING: {validity.describe()}")
    for name, m in report["metrics"].items():
        print(_summary_line(f"{name:7s}", m))
    if "union" in report:
        print(_summary_line("union  ", report["union"]["metrics"]))
        print(f"KL(union ‖ merged) = {report['union']['kl_union_to_merged']:.4g} nats")
    print(f"[fedbayes] merged posterior and metrics in {out}")
    return 0


def _check_union(a: LoadedRun, b: LoadedRun, c: LoadedRun) -> list[str]:
    """The --union run must share dataset, model, shapes and prior; returns notes on its client set."""
    from fedbayes.whatif import RunMismatchError, architecture, same_partition

    for x in (a, b):
        if architecture(x.exp) != architecture(c.exp):
            raise RunMismatchError(f"--union run {c.path} differs from {x.path} in dataset, model or prior: "
                                   f"{architecture(c.exp)} vs {architecture(x.exp)}")
    if list(a.posterior().shapes.items()) != list(c.posterior().shapes.items()):
        raise RunMismatchError(f"--union run {c.path} has other parameter shapes than {a.path}")
    if same_partition(a, c) and same_partition(b, c):
        if sorted(set(a.active) | set(b.active)) != sorted(c.active):
            return [f"the --union run's clients {c.active} are not the union of {a.active} and {b.active}"]
        return []
    return ["the --union run uses another partition: that it holds exactly the union of the clients is not checked"]


# ============================================================================================ benchmark
# ============================================================================================ parsers
def add_subparsers(sub: Any) -> None:
    """Add ``whatif``, ``influence``, ``forget``, and ``merge`` to ``sub`` (argparse subparsers)."""
    w = sub.add_parser("whatif", help="the global posterior without some clients, from the stored sites")
    w.add_argument("dir", help="a run folder (pvi, fedlap-cov or bayes-admm)")
    w.add_argument("--remove", required=True, metavar="CLIENT[,CLIENT…]", help="client (partition) ids")
    w.add_argument("--out", help="new folder (default DIR-without-IDS beside DIR)")
    w.add_argument("--verify", action="store_true", help="also retrain without them and compare")
    w.add_argument("--keep-retrain", action="store_true", help="keep the retrained run under OUT/retrain")
    w.add_argument("--estimator", help="contribution estimator (bayes-admm: site | corrected-dual | dual)")
    w.add_argument("--no-fallback", action="store_true",
                   help="fail instead of the bounded step back when a precision would fall below the prior's")
    w.add_argument("--refine", type=int, default=0, metavar="R",
                   help="then R rounds of the rule over the remaining clients, warm-started (0: the step back)")
    w.add_argument("--refine-from", choices=["trained", "step-back"], default="trained",
                   help="start the refinement from the trained global (default) or from the step back")
    w.add_argument("--eval", choices=["full", "subset", "none"], default="full",
                   help="evaluate on the test set, a fixed subset of 2,000 test examples, or not at all")
    w.add_argument("--quiet", action="store_true", help="no progress output while retraining (--verify)")
    w.set_defaults(fn=cmd_whatif)

    i = sub.add_parser("influence", help="rank clients by the predicted effect of removing each")
    i.add_argument("dir", help="a run folder (pvi, fedlap-cov or bayes-admm)")
    i.add_argument("--out", help="new folder (default DIR-influence beside DIR)")
    i.add_argument("--verify", action="store_true", help="retrain without each client and compare (slow)")
    i.add_argument("--keep-retrains", action="store_true", help="keep the retrained runs under OUT/retrain")
    i.add_argument("--estimator", help="contribution estimator (bayes-admm: site | corrected-dual | dual; "
                                       "default: the rule's first)")
    i.add_argument("--no-fallback", action="store_true",
                   help="fail instead of the bounded step back when a precision would fall below the prior's")
    i.add_argument("--refine", type=int, default=0, metavar="R", help="refine each answer by R rounds (see whatif)")
    i.add_argument("--eval", choices=["full", "subset"], default="full",
                   help="the whole test set or a fixed subset of 2,000 test examples")
    i.add_argument("--quiet", action="store_true", help="no progress output while retraining (--verify)")
    i.set_defaults(fn=cmd_influence)

    f = sub.add_parser("forget", help="write a resumable run with a client's contribution deleted")
    f.add_argument("dir", help="a run folder with a checkpoint (pvi, fedlap-cov or bayes-admm)")
    f.add_argument("--remove", required=True, metavar="CLIENT[,CLIENT…]",
                   help="client (partition) ids whose contribution is deleted")
    f.add_argument("--out", required=True,
                   help="the new run folder (must not exist); continue it with `fedbayes run --resume OUT`")
    f.add_argument("--estimator", help="contribution estimator (bayes-admm: site | corrected-dual | dual; "
                                       "default: the rule's first)")
    f.add_argument("--no-fallback", action="store_true",
                   help="fail instead of the bounded step back when a precision would fall below the prior's")
    f.set_defaults(fn=cmd_forget)

    m = sub.add_parser("merge", help="combine two runs from the same prior: λ = λ_A + λ_B − λ₀")
    m.add_argument("dir_a", help="the first run folder")
    m.add_argument("dir_b", help="the second run folder (same algorithm, model, data and prior δ as DIR_A)")
    m.add_argument("--out", required=True, help="the new folder for the merged posterior (must not exist)")
    m.add_argument("--union", metavar="DIR_C", help="a run on the union of the clients, to compare with")
    m.add_argument("--no-fallback", action="store_true",
                   help="fail instead of the bounded step back when a precision would fall below the prior's")
    m.set_defaults(fn=cmd_merge)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbayes", description="what-if analyses of fedbayes runs")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    add_subparsers(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.fn(args))
    except ValueError as e:  # WhatIfError, ConfigError, CheckpointError
        print(f"fedbayes: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
