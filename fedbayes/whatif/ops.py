"""The what-if operations on a loaded run: whatif, influence, retraining for verification, forget, merge; and
the answer folders they write (staged, then published in one rename, so a failure leaves nothing behind)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedbayes.algorithms import Algorithm
from fedbayes.algorithms.base import PosteriorState
from fedbayes.config import resolve
from fedbayes.engine import run_rounds
from fedbayes.gaussian import DiagGaussian
from fedbayes.results import ResultsWriter
from fedbayes.whatif.reliability import removal_note
from fedbayes.whatif.removal import (
    InvalidPosteriorError,
    Removal,
    Validity,
    WhatIfError,
    check_gaussian,
    merge_posteriors,
    posterior_without,
    prior_precision,
    repair_gaussian,
)
from fedbayes.whatif.runs import LoadedRun, build_federation, check_compatible, evaluate_posterior, run_federation
from fedbayes.whatif.stats import deltas, kl_diag

__all__ = [
    "EVAL_MODES", "EVAL_SUBSET", "EXCLUDE_KEY", "Answer", "eval_subset", "forget", "forget_state", "influence",
    "merge", "new_folder", "publish", "refine", "retrain_without", "staging", "whatif", "write_json",
    "write_posterior_file",
]

EXCLUDE_KEY = "exclude-clients"
"""The run-config key (:class:`fedbayes.config.RunConfig`) listing clients that are never asked to train."""


# ============================================================================================ forget
def forget_state(rule: Algorithm, slots: Iterable[int], new_global: DiagGaussian) -> dict[str, Tensor]:
    """The checkpoint state of ``rule`` (engine layout) with the clients in ``slots`` deleted and the global
    replaced by ``new_global``; every other server and client tensor is kept as it is."""
    removed = {int(s) for s in slots}
    if not isinstance(rule.state, PosteriorState):
        raise TypeError(f"{rule.name} keeps no global posterior to replace")
    server = rule.state.replace(posterior=new_global.to(dtype=torch.float64)).without_derived().to_tensors()
    out = {f"server/{k}": v for k, v in server.items()}
    for c in rule.store.clients():
        if c not in removed:
            out.update({f"client/{c}/{k}": v for k, v in rule.store.get_all(c).items()})
    return out


# ============================================================================================ folders
def new_folder(out: str | Path, sources: Iterable[str | Path] = ()) -> Path:
    """Check that ``out`` can be created as a new folder (absent or empty, not inside a source run).

    Nothing is created here; write into :func:`staging` and :func:`publish` it at the end, so a failure leaves
    no folder behind.
    """
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise WhatIfError(f"output folder {p} already exists and is not empty; choose a new one")
    rp = p.resolve()
    for s in sources:
        rs = Path(s).resolve()
        if rp == rs or rs in rp.parents:
            raise WhatIfError(f"output folder {p} lies inside the source run {s}; source runs are never modified")
    return p


def staging(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> Path:
    """Move the finished staging folder to ``out`` (which must still be absent or empty)."""
    if out.exists():
        out.rmdir()  # empty (checked by new_folder); fails loudly if something appeared meanwhile
    os.replace(tmp, out)
    return out


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ============================================================================================ operations
def write_posterior_file(path: Path, posterior: DiagGaussian, min_prec: float = 1e-8) -> None:
    """``posterior.safetensors`` in the results-folder layout: ``mean/<param>`` and ``prec/<param>`` (float64)."""
    from safetensors.torch import save_file

    post = posterior.to(dtype=torch.float64).clamp_prec(min_prec)
    tensors = {f"mean/{k}": v.contiguous() for k, v in post.mean().items()}
    tensors.update({f"prec/{k}": v.contiguous() for k, v in post.prec.items()})
    save_file(tensors, str(path))


EVAL_MODES = ("full", "subset", "none")
"""``--eval``: the whole test set, a fixed subset of :data:`EVAL_SUBSET` examples (:func:`test_subset`), or none."""
EVAL_SUBSET = 2000
REFINE_STARTS = ("trained", "step-back")
"""Where ``--refine`` starts, the default first: the trained global λ, with the removed clients' state deleted
(their duals and sites leave the server's sums at once; the remaining clients have R rounds to move the global
away from what the removed ones contributed), or the step back λ₋S.  On fmnist-10-het (docs/whatif.md) the
trained start's predicted changes have the size of the retrained ones (bayes-admm, R = 3: MAE 0.014 on Δ NLL
against a mean |actual| of 0.018) while the step back's overshoot by 10× (0.21); the step back ranks a little
better (Spearman 0.98 against 0.90)."""


def eval_subset(mode: str) -> int | None:
    """The ``subset`` argument of :meth:`LoadedRun.evaluate` for an ``--eval`` mode (``none`` is the caller's)."""
    if mode not in EVAL_MODES:
        raise WhatIfError(f"--eval must be one of {list(EVAL_MODES)}, got {mode!r}")
    return EVAL_SUBSET if mode == "subset" else None


def refine(
    run: LoadedRun, clients: Iterable[int], start: DiagGaussian, rounds: int, *, data_dir: Path | None = None
) -> tuple[DiagGaussian, dict[str, Any]]:
    """R rounds of the run's own rule over the remaining clients, warm-started from λ₋S and the stored state.

    The federation is the run's with ``clients`` excluded (so they are in no sum, average or K); its state is the
    run's checkpoint with their per-client state deleted and the global set to ``start``
    (:func:`forget_state`: every other client's site, dual and posterior as stored); rounds ``r+1..r+R`` follow
    (participants, seeds and learning-rate schedule as a resumed run would have them, with ``rounds`` extended to
    r + R where the run ended at r).  Nothing is written.  Returns the refined global posterior and its cost:
    wall seconds, client training seconds, and the bytes the R rounds would move in a federation.
    """
    if rounds < 1:
        raise WhatIfError(f"refine needs R >= 1 rounds, got {rounds}")
    ids = sorted(set(int(c) for c in clients))
    t0 = time.perf_counter()
    flat = {**run.exp.to_flat(), EXCLUDE_KEY: sorted(set(run.excluded) | set(ids)),
            "rounds": max(run.exp.run.rounds, run.round + rounds)}
    exp = resolve(flat)
    fed, _ = build_federation(exp, None, data_dir)
    fed.rule.load_state_tensors(forget_state(run.rule, run.slots(ids), start))
    rows = run_rounds(fed, exp, [], None, start_round=run.round + 1, stop_round=run.round + rounds,
                      checkpoint=False, evaluate=False)
    post = fed.rule.global_posterior()
    assert post is not None
    cost = {
        "rounds": rounds,
        "seconds": time.perf_counter() - t0,
        "client_train_s": float(sum(r["train_s"] for r in rows)),
        "bytes": int(sum(r["bytes_up"] + r["bytes_down"] for r in rows)),
        "participants": int(sum(len(r["participants"]) for r in rows)),
    }
    return post, cost


@dataclass
class Answer:
    """A what-if answer: the removal (the step back), the answer's posterior (refined when R > 0) and its report."""

    removal: Removal
    posterior: DiagGaussian
    report: dict[str, Any]


def whatif(
    run: LoadedRun, clients: Iterable[int], *, estimator: str | None = None, fallback: bool = True,
    refine_rounds: int = 0, evaluate: str = "full", data_dir: Path | None = None, refine_from: str = "trained",
) -> Answer:
    """Remove ``clients`` (partition ids) from ``run``: the step back λ₋S (:func:`posterior_without`), or with
    ``refine_rounds`` > 0 that many rounds of the rule without them (:func:`refine`), started from the trained
    global or from the step back (``refine_from``, :data:`REFINE_STARTS`).

    The report holds, unless ``evaluate="none"``, the metrics of the trained and the answer posterior (evaluated
    identically, on the whole test set or a fixed subset), the predicted change (answer − trained), KL(q ‖ q₋S),
    the step back's validity report, the seconds (and, refined, the bytes) taken, and the reliability note
    (:func:`fedbayes.whatif.reliability.removal_note`: the run against the range docs/whatif.md measured).
    """
    ids = sorted(set(int(c) for c in clients))
    slots = run.slots(ids)
    subset = eval_subset(evaluate)
    t0 = time.perf_counter()
    removal = posterior_without(run.rule, slots, estimator=estimator, fallback=fallback)
    t_estimate = time.perf_counter() - t0
    posterior, refined = removal.posterior, None
    if refine_from not in REFINE_STARTS:
        raise WhatIfError(f"refine must start from one of {list(REFINE_STARTS)}, got {refine_from!r}")
    if refine_rounds > 0:
        start = removal.posterior if refine_from == "step-back" else run.posterior().to(dtype=torch.float64)
        posterior, refined = refine(run, ids, start, refine_rounds, data_dir=data_dir)
        refined["start"] = refine_from
    t_answer = time.perf_counter() - t0
    q = run.rule.floor(run.posterior())
    report: dict[str, Any] = {
        "source": str(run.path),
        "algorithm": run.algorithm,
        "round": run.round,
        "removed": ids,
        "removed_examples": int(sum(run.num_examples(c) for c in ids)),
        "estimator": removal.estimator,
        "formula": "λ₋S = λ − β⊙Σ_{k∈S} ĝₖ (β = 1 unless a precision would fall below the prior's)",
        "validity": removal.validity.to_dict(),
        "step_back": removal.step.to_dict(),
        "refine": refined or {"rounds": 0},
        "eval": evaluate,
        "kl_full_to_whatif": kl_diag(q, posterior.clamp_prec(run.rule.config.min_prec)),
        "seconds": {"estimate": t_estimate, "answer": t_answer},
        "reliability": removal_note(run, removal, refined),
    }
    if evaluate != "none":
        full = run.full_metrics(subset)
        t1 = time.perf_counter()
        new = run.evaluate(posterior, subset=subset)
        report["seconds"]["evaluate"] = time.perf_counter() - t1
        report["seconds"]["answer"] += report["seconds"]["evaluate"]
        report.update({"full": full, "whatif": new, "predicted_change": deltas(new, full)})
    return Answer(removal, posterior, report)


def retrain_without(
    run: LoadedRun, clients: Iterable[int], out_dir: Path | None = None, *, progress: bool = False,
    subset: int | None = None, seed: int | None = None,
) -> tuple[dict[str, float], DiagGaussian, float]:
    """Train the run again from scratch without ``clients`` (same config, partition, init and seeds), as a
    federation of the remaining clients (:func:`run_federation`), up to the source's checkpoint round.

    Returns (test metrics evaluated like :func:`evaluate_posterior` at that round, on ``subset`` test examples
    when given, the retrained global posterior, seconds of training: no evaluation during the rounds).  Writes
    config, metrics and posterior to ``out_dir`` when given.  ``seed``: another training seed (the same
    partition and test subset; the noise ceiling of a benchmark), default the run's.
    """
    excluded = sorted(set(run.excluded) | {int(c) for c in clients})
    flat = {**run.exp.to_flat(), EXCLUDE_KEY: excluded}
    t0 = time.perf_counter()
    _, fed = run_federation(flat, out_dir, stop_round=run.round, progress=progress, evaluate=False,
                            train_seed=seed)
    seconds = time.perf_counter() - t0
    post = fed.rule.global_posterior()
    assert post is not None
    metrics = evaluate_posterior(fed, run.exp, post, run.round, fed.rule.config.min_prec, subset=subset)
    return metrics, post, seconds


def influence(
    run: LoadedRun, *, estimator: str | None = None, fallback: bool = True, refine_rounds: int = 0,
    evaluate: str = "full",
) -> list[dict[str, Any]]:
    """For every client of ``run``: the predicted change of every test metric from removing it alone and
    KL(q ‖ q₋ₖ), with the step back's report and timings (one row per client, in client order).  The trained
    posterior is evaluated once and shared by every row."""
    rows = []
    took_part = run.rule.contributions(estimator or run.rule.removal_estimators[0])
    for c in run.active:
        if run.slots([c])[0] not in took_part:
            continue  # never took part: nothing to remove (a whatif about it is an error)
        ans = whatif(run, [c], estimator=estimator, fallback=fallback, refine_rounds=refine_rounds,
                     evaluate=evaluate)
        removal, rep = ans.removal, ans.report
        rows.append({
            "client": c,
            "num_examples": run.num_examples(c),
            "predicted": rep.get("whatif", {}),
            "predicted_change": rep.get("predicted_change", {}),
            "refine": rep["refine"],
            "kl": rep["kl_full_to_whatif"],
            "invalid_entries": removal.validity.total_broken,
            "damped": removal.step.damped,
            "beta_mean": removal.step.beta_mean,
            "fallback": removal.validity.fallback,
            "seconds": rep["seconds"],
            "reliability": rep["reliability"],
        })
    return rows


def forget(
    run: LoadedRun, clients: Iterable[int], folder: Path, *, estimator: str | None = None, fallback: bool = True,
    name: Path | None = None,
) -> dict[str, Any]:
    """Write to ``folder`` a resumable run equal to ``run`` with ``clients`` deleted.

    Files: ``config.json`` (the source's, with ``exclude-clients`` extended), ``metrics.jsonl`` (the metrics so
    far), ``checkpoint/`` (the engine's layout, slot = client id: the clients' sites/duals/posteriors deleted,
    the global set to λ₋S, everything else as it was), ``posterior.safetensors`` (λ₋S) and ``forget.json``
    (what was done, λ₋S's validity and test metrics).  The source folder is only read.
    ``fedbayes run --resume FOLDER --rounds R`` continues without them (the engine never asks an excluded
    client).  ``name`` is the folder's final path (when ``folder`` is a staging folder), for the resume hint.
    """
    ids = sorted(set(int(c) for c in clients))
    ans = whatif(run, ids, estimator=estimator, fallback=fallback)
    removal, rep = ans.removal, ans.report
    state = forget_state(run.rule, removal.slots, removal.posterior)
    excluded = sorted(set(run.excluded) | set(ids))
    flat = {**run.exp.to_flat(), EXCLUDE_KEY: excluded}
    exp = resolve(flat)
    # the state must load into the rule the resumed run will build
    template = {k: v.detach() for k, v in run.fed.model.named_parameters()}
    check_rule = exp.algorithm_cls(template, exp.run.num_clients, exp.algo,
                                    participants=exp.run.participants_per_round())
    check_rule.load_state_tensors(state)
    new_active = [c for c in run.active if c not in ids]
    writer = ResultsWriter(folder, exp.to_flat())
    rows = list(run.meta["metrics"])
    writer.rewrite_metrics(rows)
    post = check_rule.global_posterior()
    writer.write_posterior(check_rule.global_mean(), check_rule.floor(post) if post is not None else None)
    writer.write_checkpoint(run.round, state, rows, extra={"forgotten": ids, "source": str(run.path)})
    info = {**rep, "active_clients": new_active, "excluded": excluded,
            "resume": f"fedbayes run --resume {name or folder} --rounds R"}
    write_json(folder / "forget.json", info)
    return info


def merge(a: LoadedRun, b: LoadedRun, *, fallback: bool = True) -> tuple[DiagGaussian, Validity, list[str]]:
    """λ = λ_A + λ_B − λ₀ for two compatible runs (:func:`check_compatible`); validity-checked and repaired
    like :func:`posterior_without` (broken entries -> prior precision at the mean of λ_A + λ_B)."""
    notes = check_compatible(a, b)
    prior = a.rule.prior0(prior_precision(a.rule))
    ga, gb = a.rule.global_posterior(), b.rule.global_posterior()
    assert ga is not None and gb is not None
    merged = merge_posteriors([ga, gb], prior)
    floor = a.rule.config.min_prec
    validity = check_gaussian(merged, floor)
    if not validity.ok:
        if not fallback:
            raise InvalidPosteriorError(f"the merged posterior is improper: {validity.describe()}")
        ref = (a.rule.floor(ga) + b.rule.floor(gb)).clamp_prec(floor)
        merged = repair_gaussian(merged, ref, prior_precision(a.rule), floor)
        validity = Validity(validity.broken, validity.numel, validity.min_prec, validity.floor,
                            fallback=f"broken entries set to the prior precision {prior_precision(a.rule):g}")
    return merged, validity, notes
