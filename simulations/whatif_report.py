"""The influence study behind ``fedbayes influence``: every client's predicted removal effect (and, verified, the
retrained one), written as influence.json/.csv/.md/.png and scatter.png.  The estimates are
:func:`fedbayes.whatif.influence`'s; this module runs them, optionally retrains, and writes the reports."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbayes.whatif.stats import influence_stats

if TYPE_CHECKING:
    from fedbayes.whatif import LoadedRun

__all__ = ["SHOWN", "fmt", "plot_answer", "primary_metric", "run_influence"]

SHOWN = ("test_accuracy", "test_nll", "bma_test_accuracy", "bma_test_nll")


def fmt(x: Any, digits: int = 4) -> str:
    """A signed change for a report table (empty for None)."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:+.{digits}f}" if abs(x) < 1e3 else f"{x:.3g}"
    return str(x)


def primary_metric(metrics: dict[str, float]) -> str:
    """The metric the reports rank by: the posterior average's NLL when the run has one, else the NLL."""
    return "bma_test_nll" if "bma_test_nll" in metrics else "test_nll"


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
    note = info["reliability"]
    md = [f"# Client influence: {info['algorithm']} ({info['source']}, round {info['round']})", ""]
    if not note["ok"]:
        md += ["**Reliability: outside what docs/whatif.md measured; these predictions may be far off.**", ""]
        md += [f"- {w}" for w in note["warnings"]] + ["", f"Suggestion: {note['suggest']}", ""]
    md += [
          f"Predicted change of the test metrics if the client had never taken part, λ₋ₖ = λ − ĝₖ "
          f"(estimator `{info['estimator']}`), ranked by predicted change of `{primary}` (largest increase "
          f"first: the most useful client).  KL = KL(q ‖ q₋ₖ) in nats.", ""]
    cols = ["rank", "client", "N", *[f"pred Δ{k}" for k in keys], "KL", "invalid"]
    if verify:
        cols += [*[f"actual Δ{k}" for k in keys], "retrain s"]
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["rank"]), str(r["client"]), str(r["num_examples"]),
                 *[fmt(r["predicted_change"][k]) for k in keys], f"{r['kl']:.4g}", str(r["invalid_entries"])]
        if verify:
            cells += [*[fmt(r["actual_change"].get(k)) for k in keys], f"{r['retrain_s']:.3g}"]
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
    title = f"{info['algorithm']}: influence of each client"
    if not note["ok"]:
        title += "\nWARNING: outside the measured range, see influence.md"
    ax.set_title(title, fontsize=10, color="k" if note["ok"] else "firebrick")
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
    refine_rounds: int = 0, evaluate: str = "full",
) -> dict[str, Any]:
    """Compute the influence table of ``run`` (a :class:`~fedbayes.whatif.LoadedRun`) and write its reports
    (influence.json/.csv/.md/.png, scatter.png when verified) into ``folder``.  ``refine_rounds`` and
    ``evaluate`` (``full`` or ``subset``) as for :func:`fedbayes.whatif.whatif`; retrained runs are evaluated on
    the same examples."""
    from fedbayes.whatif import estimators, influence, retrain_without, write_json
    from fedbayes.whatif.ops import eval_subset
    from fedbayes.whatif.reliability import influence_note

    if evaluate == "none":
        raise ValueError("influence ranks clients by a metric: it needs --eval full or subset")
    subset = eval_subset(evaluate)
    full = run.full_metrics(subset)
    primary = primary_metric(full)
    rows = influence(run, estimator=estimator, fallback=fallback, refine_rounds=refine_rounds, evaluate=evaluate)
    note = influence_note(run, {r["client"]: r["reliability"] for r in rows})
    est_name = estimator or estimators(run.algorithm)[0]
    if verify:
        for r in rows:
            keep = folder / "retrain" / f"without-{r['client']}" if keep_retrains else None
            if progress:
                print(f"[fedbayes] retraining without client {r['client']} …", flush=True)
            metrics, _post, seconds = retrain_without(run, [r["client"]], keep, subset=subset)
            r["retrained"] = metrics
            r["actual_change"] = {k: metrics[k] - full[k] for k in metrics if k in full}
            r["retrain_s"] = seconds
    rows.sort(key=lambda r: -r["predicted_change"].get(primary, 0.0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    answer = [r["seconds"]["answer"] for r in rows]
    info: dict[str, Any] = {
        "source": str(run.path), "algorithm": run.algorithm, "round": run.round, "estimator": est_name,
        "primary_metric": primary, "full": full, "clients": rows, "reliability": note,
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
            alt = {r["client"]: r for r in influence(run, estimator=other, fallback=fallback, evaluate=evaluate)}
            info.setdefault("other_estimators", {})[other] = {
                "stats": {k: influence_stats([alt[r["client"]]["predicted_change"][k] for r in rows],
                                             [r["actual_change"][k] for r in rows]) for k in keys},
                "predicted_change": {r["client"]: alt[r["client"]]["predicted_change"] for r in rows},
            }
    write_json(folder / "influence.json", info)
    info["files"] = [str(p) for p in _write_influence_reports(folder, info)]
    return info


def plot_answer(path: Path, report: dict[str, Any]) -> Path:
    """``answer.png``: the trained posterior's test metrics beside the what-if answer's (and, verified, the
    retrained posterior's), one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, ans = report["full"], report["whatif"]
    retrained = report.get("verify", {}).get("retrained")
    keys = [k for k in SHOWN if k in full and k in ans]
    names = ["trained", f"answer (R={report['refine']['rounds']})"] + (["retrained"] if retrained else [])
    colors = ["#888888", "#1f77b4", "#2ca02c"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        vals = [full[k], ans[k]] + ([retrained[k]] if retrained else [])
        ax.bar(range(len(vals)), vals, color=colors[: len(vals)])
        ax.set_xticks(range(len(vals)), names[: len(vals)], rotation=20, fontsize=8)
        lo, hi = min(vals), max(vals)
        pad = 0.5 * (hi - lo) + 1e-3 * max(abs(hi), 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(k, fontsize=9)
    fig.suptitle(f"{report['algorithm']}: without client(s) {report['removed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
