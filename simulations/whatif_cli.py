"""``fedbayes whatif | influence | forget | merge``: client removal, influence, unlearning and merging of runs.

Library: :mod:`fedbayes.whatif` (formulas, assumptions).  Register the commands in ``simulations/cli.py`` with
``whatif_cli.add_subparsers(sub)``; each parser sets ``fn`` to a function taking the parsed arguments and
returning an exit status, like the other commands.  :func:`main` runs them stand-alone
(``python -m simulations.whatif_cli influence runs/pvi``).

Every command reads its source run(s) only and writes one **new** folder: it is assembled in a temporary
sibling and moved into place at the end, so an invalid request (unknown client, point algorithm, improper
posterior without fallback, mismatched runs, an existing output folder) leaves the disk unchanged.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedbayes.whatif import LoadedRun

__all__ = ["add_subparsers", "cmd_forget", "cmd_influence", "cmd_merge", "cmd_whatif", "cmd_whatif_bench", "main"]

SHOWN = ("test_accuracy", "test_nll", "bma_test_accuracy", "bma_test_nll")


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


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:+.{digits}f}" if abs(x) < 1e3 else f"{x:.3g}"
    return str(x)


def _primary(metrics: dict[str, float]) -> str:
    return "bma_test_nll" if "bma_test_nll" in metrics else "test_nll"


def _summary_line(name: str, m: dict[str, float]) -> str:
    return f"{name}: " + " ".join(f"{k}={m[k]:.4f}" for k in SHOWN if k in m)


# ============================================================================================ whatif
def cmd_whatif(args: argparse.Namespace) -> int:
    from fedbayes.whatif import load_run, parse_clients, retrain_without, whatif, write_json, write_posterior_file

    src = Path(args.dir)
    clients = parse_clients(args.remove)
    run = load_run(src)
    run.slots(clients)  # validate before anything is written
    out = Path(args.out) if args.out else src.parent / f"{src.name}-without-{'-'.join(map(str, clients))}"
    with _new_output(out, [src]) as tmp:
        removal, report = whatif(run, clients, estimator=args.estimator, fallback=not args.no_fallback)
        write_posterior_file(tmp / "posterior.safetensors", removal.posterior, run.rule.config.min_prec)
        if args.verify:
            keep = tmp / "retrain" if args.keep_retrain else None
            metrics, _post, seconds = retrain_without(run, clients, keep, progress=not args.quiet)
            actual = {k: metrics[k] - report["full"][k] for k in metrics if k in report["full"]}
            report["verify"] = {
                "retrained": metrics,
                "actual_change": actual,
                "error": {k: report["predicted_change"][k] - actual[k] for k in actual
                          if k in report["predicted_change"]},
                "retrain_s": seconds,
                "speedup": seconds / max(report["seconds"]["answer"], 1e-12),
            }
        write_json(tmp / "metrics.json", report)
    v = report["validity"]
    print(f"[fedbayes] {report['algorithm']}: removed client(s) {clients} "
          f"({report['removed_examples']} examples) with estimator '{report['estimator']}'")
    if not v["ok"]:
        print(f"[fedbayes] WARNING: λ₋S was not a valid Gaussian: {v['total_broken']} of {v['numel']} entries "
              f"with precision <= {v['floor']:g} ({v['broken']}); fallback applied: {v['fallback']}")
    if report["without_contribution"]:
        print(f"[fedbayes] note: client(s) {report['without_contribution']} never replied (nothing to remove)")
    print(_summary_line("trained ", report["full"]))
    print(_summary_line("what-if ", report["whatif"]))
    print("predicted change: " + " ".join(f"{k}={_fmt(report['predicted_change'][k])}" for k in SHOWN
                                           if k in report["predicted_change"]))
    print(f"KL(q ‖ q₋S) = {report['kl_full_to_whatif']:.4g} nats; answer in {report['seconds']['answer']:.3f} s")
    if "verify" in report:
        ver = report["verify"]
        print(_summary_line("retrained", ver["retrained"]))
        print("actual change:    " + " ".join(f"{k}={_fmt(ver['actual_change'][k])}" for k in SHOWN
                                             if k in ver["actual_change"]))
        print(f"retraining took {ver['retrain_s']:.1f} s ({ver['speedup']:.0f}× the what-if answer)")
    print(f"[fedbayes] what-if posterior and metrics in {out}")
    return 0


# ============================================================================================ influence
def influence_stats(pred: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation, Pearson correlation and mean absolute error of predicted vs actual."""
    from fedbayes.whatif import spearman

    p, a = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    pearson = float(np.corrcoef(p, a)[0, 1]) if p.std() > 0 and a.std() > 0 else math.nan
    return {"spearman": spearman(p, a), "pearson": pearson, "mae": float(np.abs(p - a).mean()),
            "mean_abs_actual": float(np.abs(a).mean())}


def _write_influence_reports(folder: Path, info: dict[str, Any]) -> list[Path]:
    """influence.csv, influence.md, influence.png (and scatter.png when verified)."""
    rows: list[dict[str, Any]] = info["clients"]
    primary = info["primary_metric"]
    verify = "actual_change" in rows[0] if rows else False
    keys = [k for k in SHOWN if k in rows[0]["predicted_change"]] if rows else []
    header = ["rank", "client", "num_examples", *[f"pred_d_{k}" for k in keys], "kl", "invalid_entries"]
    if verify:
        header += [*[f"actual_d_{k}" for k in keys], "retrain_s"]
    with open(folder / "influence.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            line: list[Any] = [r["rank"], r["client"], r["num_examples"], *[r["predicted_change"][k] for k in keys],
                               r["kl"], r["invalid_entries"]]
            if verify:
                line += [*[r["actual_change"].get(k, "") for k in keys], r["retrain_s"]]
            w.writerow(line)
    md = [f"# Client influence: {info['algorithm']} ({info['source']}, round {info['round']})", "",
          f"Predicted change of the test metrics if the client had never taken part, λ₋ₖ = λ − ĝₖ "
          f"(estimator `{info['estimator']}`), ranked by predicted change of `{primary}` (largest increase "
          f"first: the most useful client).  KL = KL(q ‖ q₋ₖ) in nats.", ""]
    cols = ["rank", "client", "N", *[f"pred Δ{k}" for k in keys], "KL", "invalid"]
    if verify:
        cols += [*[f"actual Δ{k}" for k in keys], "retrain s"]
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["rank"]), str(r["client"]), str(r["num_examples"]),
                 *[_fmt(r["predicted_change"][k]) for k in keys], f"{r['kl']:.4g}", str(r["invalid_entries"])]
        if verify:
            cells += [*[_fmt(r["actual_change"].get(k)) for k in keys], f"{r['retrain_s']:.3g}"]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", f"What-if answers: {info['seconds']['answer_mean']:.3f} s per client on average "
               f"({info['seconds']['estimate_mean'] * 1e3:.2f} ms for λ₋ₖ itself, the rest is evaluation)."]
    if verify:
        md += [f"Retraining: {info['seconds']['retrain_mean']:.3g} s per client "
               f"({info['seconds']['speedup']:.0f}× slower than the what-if answer).", "",
               "| metric | Spearman | Pearson | MAE | mean abs actual |", "|---|---|---|---|---|"]
        for k, s in info["stats"].items():
            md.append(f"| {k} | {s['spearman']:.3f} | {s['pearson']:.3f} | {s['mae']:.4g} | "
                      f"{s['mean_abs_actual']:.4g} |")
    if any(r["invalid_entries"] for r in rows):
        md += ["", "Some q₋ₖ were not valid Gaussians; their broken entries were floored at the prior precision "
                   "(column `invalid`)."]
    (folder / "influence.md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [folder / "influence.csv", folder / "influence.md"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.2))
    x = np.arange(len(rows))
    width = 0.4 if verify else 0.7
    ax.bar(x - (width / 2 if verify else 0), [r["predicted_change"][primary] for r in rows], width,
           label="predicted (what-if)")
    if verify:
        ax.bar(x + width / 2, [r["actual_change"].get(primary, math.nan) for r in rows], width,
               label="actual (retrained)")
    ax.set_xticks(x, [str(r["client"]) for r in rows])
    ax.set_xlabel("client (ranked)")
    ax.set_ylabel(f"Δ {primary} if removed")
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=8)
    ax.set_title(f"{info['algorithm']}: influence of each client", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "influence.png", dpi=110)
    plt.close(fig)
    paths.append(folder / "influence.png")
    if verify:
        fig, ax = plt.subplots(figsize=(5, 5))
        p = [r["predicted_change"][primary] for r in rows]
        a = [r["actual_change"].get(primary, math.nan) for r in rows]
        ax.scatter(p, a)
        for r, pi, ai in zip(rows, p, a, strict=True):
            ax.annotate(str(r["client"]), (pi, ai), fontsize=8, xytext=(3, 3), textcoords="offset points")
        lo, hi = float(np.nanmin(p + a)), float(np.nanmax(p + a))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
        s = info["stats"][primary]
        ax.set_title(f"{info['algorithm']}: Δ{primary}, Spearman {s['spearman']:.2f}, MAE {s['mae']:.3g}",
                     fontsize=9)
        ax.set_xlabel("predicted (what-if)")
        ax.set_ylabel("actual (retrained)")
        fig.tight_layout()
        fig.savefig(folder / "scatter.png", dpi=110)
        plt.close(fig)
        paths.append(folder / "scatter.png")
    return paths


def run_influence(
    run: LoadedRun, folder: Path, *, verify: bool, estimator: str | None = None, fallback: bool = True,
    keep_retrains: bool = False, progress: bool = False, extra_estimators: Sequence[str] = (),
) -> dict[str, Any]:
    """Compute the influence table of ``run`` (a :class:`~fedbayes.whatif.LoadedRun`) and write its reports
    (influence.json/.csv/.md/.png, scatter.png when verified) into ``folder``."""
    from fedbayes.whatif import estimators, influence, retrain_without, write_json

    full = run.full_metrics()
    primary = _primary(full)
    rows = influence(run, estimator=estimator, fallback=fallback)
    est_name = estimator or estimators(run.algorithm)[0]
    if verify:
        for r in rows:
            keep = folder / "retrain" / f"without-{r['client']}" if keep_retrains else None
            if progress:
                print(f"[fedbayes] retraining without client {r['client']} …", flush=True)
            metrics, _post, seconds = retrain_without(run, [r["client"]], keep)
            r["retrained"] = metrics
            r["actual_change"] = {k: metrics[k] - full[k] for k in metrics if k in full}
            r["retrain_s"] = seconds
    rows.sort(key=lambda r: -r["predicted_change"].get(primary, 0.0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    answer = [r["seconds"]["answer"] for r in rows]
    info: dict[str, Any] = {
        "source": str(run.path), "algorithm": run.algorithm, "round": run.round, "estimator": est_name,
        "primary_metric": primary, "full": full, "clients": rows,
        "seconds": {"answer_mean": float(np.mean(answer)),
                    "estimate_mean": float(np.mean([r["seconds"]["estimate"] for r in rows]))},
    }
    if verify:
        keys = [k for k in SHOWN if k in full]
        info["stats"] = {k: influence_stats([r["predicted_change"][k] for r in rows],
                                            [r["actual_change"][k] for r in rows]) for k in keys}
        info["seconds"]["retrain_mean"] = float(np.mean([r["retrain_s"] for r in rows]))
        info["seconds"]["speedup"] = info["seconds"]["retrain_mean"] / max(info["seconds"]["answer_mean"], 1e-12)
        info["seconds"]["speedup_estimate_only"] = info["seconds"]["retrain_mean"] / max(
            info["seconds"]["estimate_mean"], 1e-12)
        for other in extra_estimators:
            alt = {r["client"]: r for r in influence(run, estimator=other, fallback=fallback)}
            info.setdefault("other_estimators", {})[other] = {
                "stats": {k: influence_stats([alt[r["client"]]["predicted_change"][k] for r in rows],
                                             [r["actual_change"][k] for r in rows]) for k in keys},
                "predicted_change": {r["client"]: alt[r["client"]]["predicted_change"] for r in rows},
            }
    write_json(folder / "influence.json", info)
    info["files"] = [str(p) for p in _write_influence_reports(folder, info)]
    return info


def cmd_influence(args: argparse.Namespace) -> int:
    src = Path(args.dir)
    out = Path(args.out) if args.out else src.parent / f"{src.name}-influence"
    from fedbayes.whatif import load_run

    run = load_run(src)  # fails (unsupported algorithm, missing checkpoint) before any folder exists
    with _new_output(out, [src]) as tmp:
        run_influence(run, tmp, verify=args.verify, estimator=args.estimator, fallback=not args.no_fallback,
                             keep_retrains=args.keep_retrains, progress=not args.quiet)
    print((out / "influence.md").read_text())
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
    if not v["ok"]:
        print(f"[fedbayes] WARNING: {v['total_broken']} entries had precision <= {v['floor']:g}; {v['fallback']}")
    print(_summary_line("after forgetting", info["whatif"]))
    print(f"[fedbayes] run without client(s) {clients} in {out} (round {info['round']}, clients "
          f"{info['active_clients']}); continue with: {info['resume']}")
    return 0


# ============================================================================================ merge
def cmd_merge(args: argparse.Namespace) -> int:
    from fedbayes.whatif import kl_diag, load_run, merge, write_json, write_posterior_file

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
def cmd_whatif_bench(args: argparse.Namespace) -> int:
    """Base run per algorithm, then influence with retraining; JSON per algorithm and a summary."""
    from fedbayes.config import parse_sets
    from fedbayes.engine import run_experiment
    from fedbayes.whatif import estimators, load_run, write_json
    from simulations.presets import load_preset

    preset = load_preset(args.preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = parse_sets(args.set)
    for algo in args.algorithms.split(","):
        base = out / algo / "run"
        if not (base / "checkpoint" / "meta.json").exists():
            t0 = time.perf_counter()
            run_experiment(preset.config_for(algo, sets), base, progress=not args.quiet)
            print(f"[fedbayes] {algo}: base run took {time.perf_counter() - t0:.0f} s", flush=True)
        folder = out / algo / "influence"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        extra = list(estimators(algo))[1:]
        info = run_influence(load_run(base), folder, verify=True, progress=not args.quiet, extra_estimators=extra)
        bench = {
            "preset": preset.name, "algorithm": algo, "sets": sets, "round": info["round"],
            "estimator": info["estimator"], "stats": info["stats"], "seconds": info["seconds"],
            "other_estimators": {k: v["stats"] for k, v in info.get("other_estimators", {}).items()},
            "full": info["full"],
            "clients": [{k: r[k] for k in ("client", "num_examples", "predicted_change", "actual_change", "kl",
                                           "invalid_entries", "retrain_s")} for r in info["clients"]],
        }
        write_json(out / algo / "bench.json", bench)
        s = info["stats"][info["primary_metric"]]
        print(f"[fedbayes] {algo}: Spearman {s['spearman']:.3f}, MAE {s['mae']:.4g}, speedup "
              f"{info['seconds']['speedup']:.0f}×", flush=True)
    summary = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/bench.json"))}
    write_json(out / "bench.json", summary)
    print(f"[fedbayes] {out / 'bench.json'}")
    return 0


# ============================================================================================ parsers
def add_subparsers(sub: Any) -> None:
    """Add ``whatif``, ``influence``, ``forget``, ``merge`` and ``whatif-bench`` to ``sub`` (argparse subparsers)."""
    w = sub.add_parser("whatif", help="the global posterior without some clients, from the stored sites")
    w.add_argument("dir", help="a run folder (pvi, fedlap-cov or bayes-admm)")
    w.add_argument("--remove", required=True, metavar="CLIENT[,CLIENT…]", help="client (partition) ids")
    w.add_argument("--out", help="new folder (default DIR-without-IDS beside DIR)")
    w.add_argument("--verify", action="store_true", help="also retrain without them and compare")
    w.add_argument("--keep-retrain", action="store_true", help="keep the retrained run under OUT/retrain")
    w.add_argument("--estimator", help="contribution estimator (bayes-admm: corrected-dual | dual)")
    w.add_argument("--no-fallback", action="store_true",
                   help="fail instead of flooring improper precisions at the prior precision")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(fn=cmd_whatif)

    i = sub.add_parser("influence", help="rank clients by the predicted effect of removing each")
    i.add_argument("dir")
    i.add_argument("--out", help="new folder (default DIR-influence beside DIR)")
    i.add_argument("--verify", action="store_true", help="retrain without each client and compare (slow)")
    i.add_argument("--keep-retrains", action="store_true", help="keep the retrained runs under OUT/retrain")
    i.add_argument("--estimator")
    i.add_argument("--no-fallback", action="store_true")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(fn=cmd_influence)

    f = sub.add_parser("forget", help="write a resumable run with a client's contribution deleted")
    f.add_argument("dir")
    f.add_argument("--remove", required=True, metavar="CLIENT[,CLIENT…]")
    f.add_argument("--out", required=True)
    f.add_argument("--estimator")
    f.add_argument("--no-fallback", action="store_true")
    f.set_defaults(fn=cmd_forget)

    m = sub.add_parser("merge", help="combine two runs from the same prior: λ = λ_A + λ_B − λ₀")
    m.add_argument("dir_a")
    m.add_argument("dir_b")
    m.add_argument("--out", required=True)
    m.add_argument("--union", metavar="DIR_C", help="a run on the union of the clients, to compare with")
    m.add_argument("--no-fallback", action="store_true")
    m.set_defaults(fn=cmd_merge)

    b = sub.add_parser("whatif-bench", help="benchmark: predicted vs retrained influence of every client")
    b.add_argument("--preset", default="fmnist-10-het")
    b.add_argument("--algorithms", default="pvi,bayes-admm")
    b.add_argument("--set", action="append", metavar="KEY=VALUE")
    b.add_argument("--out", default="runs/whatif-bench")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_whatif_bench)


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
