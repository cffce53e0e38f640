"""``fedbayes bench whatif``: what-if answers against retraining from scratch, client by client.

For each case and rule: one base run; for every client k, retraining from scratch without k (the engine's own
loop over the remaining clients: same partition, initialisation, participants and seeds); and the what-if answers
without k, the pure step back (R = 0) and the step back refined by R rounds (:func:`fedbayes.whatif.whatif`).
Predicted change = answer − trained, actual change = retrained − trained, on the whole test set, for the test NLL
and accuracy of the reported prediction (the posterior average where the run has one) and of the mean.

Reported per (case, rule, R): Spearman's ρ between predicted and actual changes with a bootstrap 90 % interval
(clients resampled, 2,000 draws), Pearson's r, the mean absolute error beside the mean absolute actual change;
speed as ratios measured in the same process: the retraining's training seconds over the answer's seconds
(step back + refinement + an evaluation on the fixed 2,000-example test subset of ``--eval subset``), with the
client training seconds and message bytes of each.  ``--ceiling-seeds S`` adds the noise ceiling: the base run and
every retraining again with S more training seeds (same partition), and the Spearman ρ between the actual changes
of two seeds (a what-if answer cannot be expected to agree with retraining better than retraining agrees with
itself).

Cases (``--cases``): ``fmnist-10-het`` (the tuned preset, 10 clients), ``fmnist-20-het`` (its settings on 20
heterogeneous clients: with 10 clients a rank correlation of 0.5 is not distinguishable from chance),
``fmnist-classes`` (10 clients, each holding one class of its own: removing a client removes a class);
``digits-10-het`` (small and quick: a smoke test of the benchmark itself).

Everything is resumable: each base run, retraining and answer set is a file under ``OUT/<case>/<rule>/``, skipped
when present; ``--jobs J`` trains J runs at a time (one torch thread each).  Outputs: ``bench.json``, ``table.md``
and ``scatter-<case>-<rule>.png`` in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CASES", "bootstrap_spearman", "main"]

CASES: dict[str, dict[str, Any]] = {
    "fmnist-10-het": {"preset": "fmnist-10-het", "sets": {}},
    "fmnist-20-het": {"preset": "fmnist-10-het", "sets": {"num-clients": 20}},
    # one class per client: fmnist-10-het's sigmoid, 10-epoch, damping-0.03 settings stay near chance (validation
    # accuracy 0.10-0.37 over 30 rounds, five variants tried); relu, 1 epoch, damping 0.5 reaches 0.70 validation
    # accuracy at round 30 (probe of 2026-12-02 on a 10 % validation split, docs/whatif.md)
    "fmnist-classes": {"preset": "fmnist-10-het",
                       "sets": {"partition": "shards", "classes-per-client": 1, "num-clients": 10,
                                "activation": "relu", "epochs": 1, "damping": 0.5, "rounds": 30}},
    "digits-10-het": {"preset": "digits-10-het", "sets": {}},
}
METRICS = ("test_nll", "test_accuracy", "bma_test_nll", "bma_test_accuracy")
Job = tuple[str, Path, dict[str, Any], int | None, int | None]
"""(kind, path, flat config, client, seed): one training job (:func:`_task`)."""


def bootstrap_spearman(pred: Sequence[float], actual: Sequence[float], draws: int = 2000, seed: int = 0
                       ) -> tuple[float, float]:
    """A bootstrap 90 % interval of Spearman's ρ (pairs resampled with replacement; degenerate draws skipped)."""
    from fedbayes.whatif import spearman

    p, a = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        i = rng.integers(0, len(p), len(p))
        if np.ptp(p[i]) == 0 or np.ptp(a[i]) == 0:
            continue
        vals.append(spearman(p[i], a[i]))
    if not vals:
        return math.nan, math.nan
    lo, hi = np.quantile(vals, [0.05, 0.95])
    return float(lo), float(hi)


def _config(case: str, algorithm: str, rounds: int | None, seed: int | None = None) -> dict[str, Any]:
    from fedbayes.presets import load_preset

    spec = CASES[case]
    sets = dict(spec["sets"])
    if rounds is not None:
        sets["rounds"] = rounds
    flat = load_preset(spec["preset"]).config_for(algorithm, sets)
    if seed is not None:
        flat["seed"] = seed
    return flat


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ tasks
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _task(job: Job) -> str:
    """One job: ``("base", folder, flat, None, None)``, ``("retrain", file, flat, client, seed)``,
    ``("ceiling", file, flat, None, seed)`` or ``("answers", file, {"refine": [...]}, None, None)``."""
    kind, path, flat, client, seed = job
    if kind == "answers":
        _write(path, _answers(path.parent, flat["refine"]))
        return f"{path}: answered"
    if kind == "base":
        from fedbayes.engine import run_experiment
        from fedbayes.results import load_checkpoint

        try:
            meta, _ = load_checkpoint(path)
            if int(meta["round"]) >= int(flat["rounds"]):
                return f"{path}: done"
            run_experiment({"rounds": flat["rounds"]}, path, progress=False, resume=True)
        except Exception:  # no (or an unusable) checkpoint: start afresh
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            run_experiment(flat, path, progress=False)
        return f"{path}: trained"
    from fedbayes.whatif import load_run, retrain_without

    # retrain: the federation without ``client``; ceiling: the whole federation again with another seed
    run = load_run((path.parent.parent.parent if kind == "retrain" else path.parent) / "run")
    metrics, _post, seconds = retrain_without(run, [] if client is None else [client], seed=seed)
    _write(path, {"client": client, "seed": seed, "metrics": metrics, "train_seconds": seconds})
    return f"{path}: {seconds:.0f} s"


def _pool_run(jobs: list[Job], workers: int) -> None:
    if not jobs:
        return
    if workers <= 1:
        _init_worker()
        for j in jobs:
            print(f"[bench whatif] {_task(j)}", flush=True)
        return
    from fedbayes.noise import share_cores

    share_cores(workers)  # one-thread workers filling the cores: no noise thread (fedbayes.noise)
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        for msg in pool.imap_unordered(_task, jobs):
            print(f"[bench whatif] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ answers
def _answers(folder: Path, refine_rounds: Sequence[int]) -> dict[str, Any]:
    """Every client's what-if answers, evaluated on the whole test set: with every contribution estimator of the
    rule at R = 0, and at each R in ``refine_rounds`` with the rule's best R = 0 estimator (``dual`` for
    bayes-admm, ``site`` for the site rules), from the step back and from the trained global; plus the seconds of one
    evaluation on the fixed 2,000-example subset (for the speed ratio).  Keyed ``"<estimator>/R<r>"``."""
    import torch

    from fedbayes.whatif import estimators, load_run, whatif
    from fedbayes.whatif.ops import EVAL_SUBSET

    torch.set_num_threads(1)
    run = load_run(folder / "run")
    full = run.full_metrics()
    t0 = time.perf_counter()
    run.evaluate(run.posterior(), subset=EVAL_SUBSET)
    subset_eval_s = time.perf_counter() - t0
    out: dict[str, Any] = {"full": full, "subset_eval_s": subset_eval_s, "round": run.round, "answers": {}}
    names = estimators(run.algorithm)
    refined = "dual" if "dual" in names else names[0]  # bayes-admm: its best R = 0 estimator (docs/whatif.md)
    plan = [(e, 0, "step-back") for e in names] + [(refined, r, "step-back") for r in refine_rounds if r > 0]
    plan += [(refined, r, "trained") for r in refine_rounds if r > 0]
    out["refined_estimator"] = refined
    out["failed"] = {}
    for est, r, start in plan:
        rows = []
        key = f"{est}/R{r}" if start == "step-back" else f"trained/R{r}"
        for c in run.active:
            try:
                ans = whatif(run, [c], estimator=est, refine_rounds=r, evaluate="full", refine_from=start)
            except (RuntimeError, ArithmeticError) as e:  # a refinement whose every client diverged
                out["failed"][key] = f"client {c}: {e}"
                break
            rep = ans.report
            rows.append({"client": c, "num_examples": run.num_examples(c), "predicted": rep["whatif"],
                         "answer_s": rep["seconds"]["estimate"] + (rep["refine"].get("seconds", 0.0)),
                         "refine": rep["refine"], "step_back": {k: rep["step_back"][k] for k in
                                                                 ("damped", "zeroed", "beta_min", "beta_mean")}})
        if key not in out["failed"]:
            out["answers"][key] = rows
    return out


# ------------------------------------------------------------------------------------------------ report
def _stats(pred: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    from fedbayes.whatif.stats import influence_stats

    s = influence_stats(pred, actual)
    lo, hi = bootstrap_spearman(pred, actual)
    return {**s, "spearman_lo90": lo, "spearman_hi90": hi}


def _summarise(folder: Path, answers: dict[str, Any], ceiling_seeds: Sequence[int], base_seed: int
               ) -> dict[str, Any]:
    full = answers["full"]
    clients = [r["client"] for r in next(iter(answers["answers"].values()))]
    retrain = {c: json.loads((folder / "retrain" / f"seed-{base_seed}" / f"without-{c}.json").read_text())
               for c in clients}
    actual = {c: {k: retrain[c]["metrics"][k] - full[k] for k in METRICS if k in full} for c in clients}
    keys = [k for k in METRICS if k in full]
    out: dict[str, Any] = {"round": answers["round"], "full": full, "clients": clients, "by_refine": {},
                           "refined_estimator": answers["refined_estimator"],
                           "retrain_s_mean": float(np.mean([retrain[c]["train_seconds"] for c in clients]))}
    for r, rows in answers["answers"].items():
        pred = {row["client"]: {k: row["predicted"][k] - full[k] for k in keys} for row in rows}
        answer_s = float(np.mean([row["answer_s"] for row in rows])) + answers["subset_eval_s"]
        out["by_refine"][r] = {
            "stats": {k: _stats([pred[c][k] for c in clients], [actual[c][k] for c in clients]) for k in keys},
            "answer_s_mean": answer_s,
            "speedup": out["retrain_s_mean"] / max(answer_s, 1e-12),
            "refine_bytes_mean": float(np.mean([row["refine"].get("bytes", 0) for row in rows])),
            "refine_client_train_s_mean": float(np.mean([row["refine"].get("client_train_s", 0.0) for row in rows])),
            "damped_mean": float(np.mean([row["step_back"]["damped"] for row in rows])),
            "predicted": pred,
        }
    out["actual"] = actual
    out["failed"] = dict(answers.get("failed", {}))
    if ceiling_seeds:
        deltas = {}
        for s in [base_seed, *ceiling_seeds]:
            base = json.loads((folder / f"ceiling-base-seed-{s}.json").read_text())["metrics"] if s != base_seed \
                else full
            deltas[s] = {c: {k: json.loads((folder / "retrain" / f"seed-{s}" / f"without-{c}.json").read_text())
                             ["metrics"][k] - base[k] for k in keys} for c in clients}
        seeds = list(deltas)
        pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        out["noise_ceiling"] = {k: float(np.mean([_stats([deltas[a][c][k] for c in clients],
                                                         [deltas[b][c][k] for c in clients])["spearman"]
                                                  for a, b in pairs])) for k in keys}
        out["noise_ceiling_seeds"] = seeds
    return out


def _scatter(path: Path, title: str, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("bma_test_nll", "bma_test_accuracy", "test_nll", "test_accuracy") if k in summary["full"]][:2]
    refines = [r for r in summary["by_refine"] if r.startswith((summary["refined_estimator"] + "/", "trained/"))]
    fig, axes = plt.subplots(len(keys), len(refines), figsize=(3.6 * len(refines), 3.4 * len(keys)), squeeze=False)
    for i, k in enumerate(keys):
        for j, r in enumerate(refines):
            ax = axes[i][j]
            br = summary["by_refine"][r]
            xs = [summary["actual"][c][k] for c in summary["clients"]]
            ys = [br["predicted"][c][k] for c in summary["clients"]]
            ax.scatter(xs, ys, s=18)
            for c, x, y in zip(summary["clients"], xs, ys, strict=True):
                ax.annotate(str(c), (x, y), fontsize=6)
            lo, hi = min(xs + ys), max(xs + ys)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            st = br["stats"][k]
            ax.set_title(f"{r}: ρ={st['spearman']:.2f} [{st['spearman_lo90']:.2f}, {st['spearman_hi90']:.2f}]",
                         fontsize=8)
            ax.set_xlabel(f"retrained Δ {k}", fontsize=8)
            ax.set_ylabel(f"predicted Δ {k}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict[str, Any]) -> str:
    lines = ["| case | rule | estimator / R | Spearman Δ NLL [90 % CI] | MAE Δ NLL (mean abs actual) | "
             "Spearman Δ acc [90 % CI] | MAE Δ acc (mean abs actual) | noise ceiling (NLL / acc) | answer s | "
             "retrain s | speed-up | MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, s in results.items():
        case, rule = key.split("/")
        nll = "bma_test_nll" if "bma_test_nll" in s["full"] else "test_nll"
        acc = "bma_test_accuracy" if "bma_test_accuracy" in s["full"] else "test_accuracy"
        ceil = s.get("noise_ceiling")
        ceil_txt = f"{ceil[nll]:.2f} / {ceil[acc]:.2f}" if ceil else "—"
        for r, br in s["by_refine"].items():
            a, b = br["stats"][nll], br["stats"][acc]
            lines.append(
                f"| {case} | {rule} | {r} | {a['spearman']:.2f} [{a['spearman_lo90']:.2f}, {a['spearman_hi90']:.2f}] | "
                f"{a['mae']:.4f} ({a['mean_abs_actual']:.4f}) | {b['spearman']:.2f} [{b['spearman_lo90']:.2f}, "
                f"{b['spearman_hi90']:.2f}] | {b['mae']:.4f} ({b['mean_abs_actual']:.4f}) | {ceil_txt} | "
                f"{br['answer_s_mean']:.2f} | {s['retrain_s_mean']:.0f} | {br['speedup']:.0f}× | "
                f"{br['refine_bytes_mean'] / 1e6:.0f} |")
        for r, why in s.get("failed", {}).items():
            lines.append(f"| {case} | {rule} | {r} | failed: {why[:160]} | | | | {ceil_txt} | | | | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbayes bench whatif", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="fmnist-10-het", help=f"comma-separated, of {sorted(CASES)}")
    p.add_argument("--algorithms", default="bayes-admm,pvi")
    p.add_argument("--rounds", type=int, help="override the case's rounds (default: the preset's, 50; "
                   "fmnist-classes: 30)")
    p.add_argument("--refine", default="0,3", help="refinement rounds R to answer with (comma-separated)")
    p.add_argument("--ceiling-seeds", type=int, default=0, help="extra training seeds for the noise ceiling")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/bench/whatif")
    args = p.parse_args(argv)
    out = Path(args.out)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise ValueError(f"unknown case(s) {bad}; valid: {sorted(CASES)}")
    refines = [int(r) for r in args.refine.split(",") if r.strip()]
    algos = [a for a in args.algorithms.split(",") if a]
    pairs = [(c, a) for c in cases for a in algos]
    base_jobs: list[Job] = []
    for c, a in pairs:
        flat = _config(c, a, args.rounds)
        (out / c / a).mkdir(parents=True, exist_ok=True)
        base_jobs.append(("base", out / c / a / "run", flat, None, None))
    _pool_run(base_jobs, args.jobs)
    seeds: dict[tuple[str, str], list[int]] = {}
    retrain_jobs: list[Job] = []
    for c, a in pairs:
        flat = _config(c, a, args.rounds)
        base_seed = int(flat["seed"])
        extra = [base_seed + 1 + i for i in range(args.ceiling_seeds)]
        seeds[(c, a)] = extra
        for s in [base_seed, *extra]:
            d = out / c / a / "retrain" / f"seed-{s}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(int(flat["num-clients"])):
                if not (d / f"without-{k}.json").exists():
                    retrain_jobs.append(("retrain", d / f"without-{k}.json", flat, k, s))
    # the noise ceiling's full runs at the extra seeds (same partition): retrain_without with nothing removed is
    # not allowed, so they are base runs of their own
    ceiling_jobs: list[Job] = []
    for c, a in pairs:
        for s in seeds[(c, a)]:
            f = out / c / a / f"ceiling-base-seed-{s}.json"
            if not f.exists():
                ceiling_jobs.append(("ceiling", f, _config(c, a, args.rounds), None, s))
    _pool_run(retrain_jobs + ceiling_jobs, args.jobs)
    results = {}
    name = f"answers-R{'-'.join(map(str, sorted(set(refines) | {0})))}.json"
    _pool_run([("answers", out / c / a / name, {"refine": refines}, None, None) for c, a in pairs
               if not (out / c / a / name).exists()], args.jobs)
    for c, a in pairs:
        folder = out / c / a
        answers = json.loads((folder / name).read_text())
        base_seed = int(_config(c, a, args.rounds)["seed"])
        summary = _summarise(folder, answers, seeds[(c, a)], base_seed)
        results[f"{c}/{a}"] = summary
        _scatter(out / f"scatter-{c}-{a}.png", f"{c}, {a}: predicted vs retrained change", summary)
    _write(out / "bench.json", results)
    (out / "table.md").write_text(_table(results))
    print((out / "table.md").read_text())
    return 0
