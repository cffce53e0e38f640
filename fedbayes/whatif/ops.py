"""The what-if operations on a loaded run: whatif, influence, retraining for verification, forget, merge; and
the answer folders they write (staged, then published in one rename, so a failure leaves nothing behind)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedbayes.algorithms import Algorithm
from fedbayes.algorithms.base import PosteriorState
from fedbayes.config import resolve
from fedbayes.gaussian import DiagGaussian
from fedbayes.results import ResultsWriter
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
from fedbayes.whatif.runs import LoadedRun, check_compatible, evaluate_posterior, run_federation
from fedbayes.whatif.stats import deltas, kl_diag

__all__ = [
    "EXCLUDE_KEY", "forget", "forget_state", "influence", "merge", "new_folder", "publish", "retrain_without",
    "staging", "whatif", "write_json", "write_posterior_file",
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
    server = rule.state.replace(posterior=new_global.to(dtype=torch.float64)).to_tensors()
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


def whatif(
    run: LoadedRun, clients: Iterable[int], *, estimator: str | None = None, fallback: bool = True
) -> tuple[Removal, dict[str, Any]]:
    """Remove ``clients`` (partition ids) from ``run``: the what-if posterior and its report.

    The report holds the metrics of the trained and the what-if posterior (evaluated identically), the
    predicted change (what-if − trained), KL(q ‖ q₋S), the validity check and the seconds taken.
    """
    ids = sorted(set(int(c) for c in clients))
    slots = run.slots(ids)
    t0 = time.perf_counter()
    removal = posterior_without(run.rule, slots, estimator=estimator, fallback=fallback)
    t_estimate = time.perf_counter() - t0
    full = run.full_metrics()
    t1 = time.perf_counter()
    new = run.evaluate(removal.posterior)
    t_eval = time.perf_counter() - t1
    q = run.rule.floor(run.posterior())
    report: dict[str, Any] = {
        "source": str(run.path),
        "algorithm": run.algorithm,
        "round": run.round,
        "removed": ids,
        "removed_examples": int(sum(run.num_examples(c) for c in ids)),
        "without_contribution": [run.active[s] for s in removal.missing],
        "estimator": removal.estimator,
        "formula": "λ₋S = λ − Σ_{k∈S} ĝₖ",
        "validity": removal.validity.to_dict(),
        "full": full,
        "whatif": new,
        "predicted_change": deltas(new, full),
        "kl_full_to_whatif": kl_diag(q, removal.posterior.clamp_prec(run.rule.config.min_prec)),
        "seconds": {"estimate": t_estimate, "evaluate": t_eval, "answer": t_estimate + t_eval},
    }
    return removal, report


def retrain_without(
    run: LoadedRun, clients: Iterable[int], out_dir: Path | None = None, *, progress: bool = False
) -> tuple[dict[str, float], DiagGaussian, float]:
    """Train the run again from scratch without ``clients`` (same config, partition, init and seeds), as a
    federation of the remaining clients (:func:`run_federation`), up to the source's checkpoint round.

    Returns (test metrics evaluated like :func:`evaluate_posterior` at that round, the retrained global
    posterior, seconds).  Writes config, metrics and posterior to ``out_dir`` when given.
    """
    excluded = sorted(set(run.excluded) | {int(c) for c in clients})
    flat = {**run.exp.to_flat(), EXCLUDE_KEY: excluded}
    t0 = time.perf_counter()
    _, fed = run_federation(flat, out_dir, stop_round=run.round, progress=progress)
    seconds = time.perf_counter() - t0
    post = fed.rule.global_posterior()
    assert post is not None
    metrics = evaluate_posterior(fed, run.exp, post, run.round, fed.rule.config.min_prec)
    return metrics, post, seconds


def influence(
    run: LoadedRun, *, estimator: str | None = None, fallback: bool = True
) -> list[dict[str, Any]]:
    """For every client of ``run``: the predicted change of every test metric from removing it alone and
    KL(q ‖ q₋ₖ), with the validity of q₋ₖ and timings (one row per client, in client order)."""
    rows = []
    for c in run.active:
        removal, rep = whatif(run, [c], estimator=estimator, fallback=fallback)
        rows.append({
            "client": c,
            "num_examples": run.num_examples(c),
            "predicted": rep["whatif"],
            "predicted_change": rep["predicted_change"],
            "kl": rep["kl_full_to_whatif"],
            "invalid_entries": removal.validity.total_broken,
            "fallback": removal.validity.fallback,
            "seconds": rep["seconds"],
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
    removal, rep = whatif(run, ids, estimator=estimator, fallback=fallback)
    state = forget_state(run.rule, removal.slots, removal.posterior)
    excluded = sorted(set(run.excluded) | set(ids))
    flat = {**run.exp.to_flat(), EXCLUDE_KEY: excluded}
    exp = resolve(flat)
    # the state must load into the rule the resumed run will build
    template = {k: v.detach() for k, v in run.fed.model.named_parameters()}
    check_rule = exp.algorithm_cls(template, exp.run.num_clients, exp.algo)
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
