r"""What if client k had never taken part?  Removing, ranking, forgetting and merging client contributions.

The sites λ̃ₖ that fedbayes keeps are each client's contribution to the global posterior (DESIGN §2), so the
posterior "without the clients S" is answered from the stored state, without retraining:

.. math::  λ_{-S} = λ - \sum_{k∈S} \hat g_k

with :math:`\hat g_k` client k's contribution.  This is the memory-perturbation view of Nickl, Xu, Tailor,
Möllenhoff, Khan, "The Memory-Perturbation Equation: Understanding Model's Sensitivity to Data", NeurIPS 2023:
removing an example (here a client) from a posterior in natural parameters subtracts its site.  It is exact
for conjugate models trained to convergence (a Gaussian likelihood with XᵀX diagonal, tested) and a
first-order estimate otherwise — the remaining clients' sites would move a little if k were absent.

Contributions per algorithm (the registry :data:`ESTIMATORS`; no per-algorithm branches elsewhere):

``pvi``, ``fedlap-cov`` — ``site``
    :math:`\hat g_k = \tilde λ_k`, the stored (damped) site.  The server keeps λ = λ₀ + Σₖ λ̃ₖ over all K
    (stale sites included), so :math:`λ_{-S} = λ_0 + \sum_{k∉S} \tilde λ_k` up to rounding.  Site
    precisions are ≥ 0 (checked on the wire), so :math:`s_{-S} ≥ δ` in exact arithmetic.

``bayes-admm`` — ``corrected-dual`` (default) and ``dual``
    Client k solves (dividing its objective by ρ) the local problem with prior πₖ = λ̄ − λ̂ₖ/ρ and
    ess = Nₖ/(τρ), and sends the site λ̃ₖ = λₖ − πₖ.  Write :math:`g_k = ρ\tilde λ_k` for the client's data
    term at temperature τ alone (exactly :math:`N_k H_k/τ` in the conjugate case; the IVON site
    :math:`N_k h_k/τ` in general).  Then, with λ̄⁻ the global that client k was configured with,

    .. math::  λ_k = \bar λ^- - \hat λ_k^-/ρ + g_k/ρ, \qquad
               \hat λ_k = \hat λ_k^- + γρ(λ_k - \bar λ^-)
               \;\Rightarrow\; g_k = \hat λ_k + (1 - γ)ρ(λ_k - \bar λ^-).

    * At the ADMM fixed point (λₖ = λ̄ for all k) the dual update is stationary, the server equation gives
      λ̄ = λ₀ + Σₖ λ̂ₖ and λ̂ₖ = gₖ: **the dual plays the role of the site** (``dual``: ĝₖ = λ̂ₖ).
    * Off the fixed point (finitely many rounds, damping γ < 1) the dual is an exponential moving average of
      gₖ that lags behind it by (1−γ)ρ(λₖ − λ̄⁻).  λ̄⁻ is not in the checkpoint (only the latest state is), so
      ``corrected-dual`` uses the stored global λ̄ in its place:
      :math:`\hat g_k = \hat λ_k + (1-γ)ρ(λ_k - \bar λ)`.  It is exact for γ = 1 (no correction) and, for
      γ < 1, exact once the global is stationary (λ̄ = λ̄⁻); it reduces to ``dual`` at the fixed point.
      Assumption: full participation, so every stored λₖ belongs to the last round (a stale λₖ of an absent
      client was formed against an older global and the correction is then only approximate).
    * Why :math:`λ̄ − \sum_{k∈S} \hat g_k` and not the server formula with the removed clients' terms dropped
      and K reduced: with λₖ held fixed that formula is one server step,
      :math:`(1-α')λ̄ + α'(λ_0 + \sum_{k∉S} g_k)` with α' = 1/(1+ρ(K−|S|)) (substitute λₖ from above),
      which moves only a fraction α' (≈ 0.18 for ρ = 0.5, K = 10) of the way to the answer; its fixed point
      is :math:`λ_0 + \sum_{k∉S} g_k`, which is what we estimate — anchored at the trained λ̄ so that
      removing nothing changes nothing and a run that has not converged keeps its own (shared) error.

Validity.  λ₋S must be a Gaussian: every precision > ``min-prec`` (the rule's floor) and everything finite.
Sites rules satisfy this by construction; a bayes-admm estimate can break it (duals may be negative).  The
broken entries are reported per parameter, and by default repaired by **flooring at the prior precision**:
entry i gets precision δ (the prior λ₀'s) and keeps the trained posterior's mean (η = δ·mᵢ) — "the remaining
clients say nothing certain about this weight" without moving the prediction.  ``fallback=False`` raises
:class:`InvalidPosteriorError` instead.

Retraining for verification ("client k had never taken part") runs the engine's round loop on a rule built
over the K' remaining clients (:func:`run_federation`): same data, partition over all K, initialisation,
participants and per-client seeds.  For the site rules it is bit-identical to the engine with
``exclude-clients`` (tested); for bayes-admm the engine's ``exclude-clients`` still counts excluded clients in
K (α = 1/(1+ρK)) and as λ₀ in the mean over clients, whose fixed point is λ₀ + Σ_{k∉S} gₖ/(1 + ρ|S|) rather
than λ₀ + Σ_{k∉S} gₖ — see ``docs/whatif.md`` for the engine change that removes the difference.

Also here: the diagonal-Gaussian KL, Spearman's rank correlation (numpy ranks, no scipy), merging runs from
the same prior (λ = λ_A + λ_B − λ₀), and evaluating any posterior exactly as the engine evaluates the global.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedbayes.algorithms import Algorithm, DiskStore
from fedbayes.algorithms.base import gaussian_from, gaussian_to
from fedbayes.algorithms.bayes_admm import BayesADMM
from fedbayes.config import Experiment, resolve
from fedbayes.engine import Federation, run_rounds
from fedbayes.gaussian import DiagGaussian, check_same_layout
from fedbayes.metrics import evaluate_model
from fedbayes.results import ResultsWriter, load_checkpoint

__all__ = [
    "ESTIMATORS",
    "EXCLUDE_KEY",
    "InvalidPosteriorError",
    "LoadedRun",
    "Removal",
    "RunMismatchError",
    "UnsupportedAlgorithmError",
    "Validity",
    "WhatIfError",
    "admm_contributions",
    "architecture",
    "build_federation",
    "check_compatible",
    "check_gaussian",
    "check_supported",
    "client_contributions",
    "deltas",
    "evaluate_posterior",
    "forget",
    "forget_state",
    "influence",
    "kl_diag",
    "load_run",
    "merge",
    "merge_posteriors",
    "new_folder",
    "parse_clients",
    "posterior_without",
    "publish",
    "rankdata",
    "remove_contributions",
    "repair_gaussian",
    "retrain_without",
    "run_federation",
    "same_partition",
    "site_contributions",
    "spearman",
    "staging",
    "supported_algorithms",
    "whatif",
    "write_json",
    "write_posterior_file",
]

log = logging.getLogger("fedbayes")

EXCLUDE_KEY = "exclude-clients"
"""The run-config key (:class:`fedbayes.config.RunConfig`) listing clients that are never asked to train."""


class WhatIfError(ValueError):
    """An invalid what-if request (reported before anything is written)."""


class UnsupportedAlgorithmError(WhatIfError):
    """The run's algorithm keeps no per-client contributions (point algorithms)."""


class InvalidPosteriorError(WhatIfError):
    """λ₋S is not a valid Gaussian and no fallback is allowed."""


class RunMismatchError(WhatIfError):
    """Two runs that cannot be combined (model, shapes, prior or data differ)."""


# ============================================================================================ contributions
ContributionFn = Callable[[Algorithm], dict[int, DiagGaussian]]


def site_contributions(rule: Algorithm) -> dict[int, DiagGaussian]:
    """ĝₖ = λ̃ₖ, the stored site of every client that has one (PVI, FedLap-Cov), keyed by rule slot."""
    out: dict[int, DiagGaussian] = {}
    for c in rule.store.clients():
        g = gaussian_from("site", rule.store.get_all(c), rule.names)
        if g is not None:
            out[c] = g
    return out


def admm_contributions(rule: Algorithm, corrected: bool = True) -> dict[int, DiagGaussian]:
    """Bayes-ADMM contributions: ĝₖ = λ̂ₖ + (1 − γ)ρ(λₖ − λ̄) (``corrected``) or ĝₖ = λ̂ₖ.

    Parameters
    ----------
    rule
        A :class:`~fedbayes.algorithms.bayes_admm.BayesADMM` with its state loaded.
    corrected
        Add the lag of the damped dual, (1 − γ)ρ(λₖ − λ̄), using the stored global λ̄ for the one the client
        was configured with (exact for γ = 1 or a stationary global; see the module docstring).
    """
    if not isinstance(rule, BayesADMM):
        raise UnsupportedAlgorithmError(f"admm_contributions needs a bayes-admm rule, got '{rule.name}'")
    rho, gamma = rule.rho, rule.config.damping
    glob = rule.global_posterior()
    out: dict[int, DiagGaussian] = {}
    for c in rule.store.clients():
        d = rule.store.get_all(c)
        dual = gaussian_from("dual", d, rule.names)
        if dual is None:
            continue
        post = gaussian_from("post", d, rule.names)
        if corrected and post is not None and gamma < 1.0:
            dual = dual + (post - glob).scale((1.0 - gamma) * rho)
        out[c] = dual
    return out


def _admm_corrected(rule: Algorithm) -> dict[int, DiagGaussian]:
    return admm_contributions(rule, corrected=True)


def _admm_dual(rule: Algorithm) -> dict[int, DiagGaussian]:
    return admm_contributions(rule, corrected=False)


ESTIMATORS: dict[str, dict[str, ContributionFn]] = {
    "pvi": {"site": site_contributions},
    "fedlap-cov": {"site": site_contributions},
    "bayes-admm": {"corrected-dual": _admm_corrected, "dual": _admm_dual},
}
"""algorithm -> {estimator name -> contributions}; the first estimator is the default."""


def supported_algorithms() -> list[str]:
    return list(ESTIMATORS)


def check_supported(algorithm: str) -> None:
    """Raise :class:`UnsupportedAlgorithmError` unless ``algorithm`` keeps per-client contributions."""
    if algorithm not in ESTIMATORS:
        raise UnsupportedAlgorithmError(
            f"algorithm '{algorithm}' keeps no per-client sites or duals (a point method or unknown), so a "
            f"client's contribution cannot be removed; what-if, influence, forget and merge support: "
            f"{', '.join(supported_algorithms())}"
        )


def _estimator(algorithm: str, estimator: str | None) -> tuple[str, ContributionFn]:
    check_supported(algorithm)
    table = ESTIMATORS[algorithm]
    name = estimator if estimator is not None else next(iter(table))
    if name not in table:
        raise WhatIfError(f"unknown estimator '{name}' for {algorithm}; valid: {list(table)}")
    return name, table[name]


def client_contributions(rule: Algorithm, estimator: str | None = None) -> dict[int, DiagGaussian]:
    """Every client's contribution ĝₖ to ``rule``'s global posterior, keyed by rule slot (float64)."""
    return _estimator(rule.name, estimator)[1](rule)


# ============================================================================================ pure algebra
def remove_contributions(
    posterior: DiagGaussian, contributions: Mapping[int, DiagGaussian], clients: Iterable[int]
) -> DiagGaussian:
    """λ₋S = λ − Σ_{k∈S} ĝₖ (a client without a contribution, e.g. one that never replied, adds nothing)."""
    out = posterior.clone()
    for c in clients:
        if c in contributions:
            out = out - contributions[c]
    return out


def merge_posteriors(posteriors: Sequence[DiagGaussian], prior: DiagGaussian) -> DiagGaussian:
    """λ = Σᵢ λᵢ − (n − 1)λ₀: the product of n posteriors from disjoint data and one shared prior λ₀.

    Exact for conjugate models (each λᵢ = λ₀ + Σ_{k∈runᵢ} gₖ); two runs give λ_A + λ_B − λ₀.
    """
    if len(posteriors) < 2:
        raise WhatIfError("merging needs at least two posteriors")
    out = posteriors[0].to(dtype=torch.float64)
    for p in posteriors[1:]:
        out = out + p.to(dtype=torch.float64)
    return out - prior.to(dtype=torch.float64).scale(float(len(posteriors) - 1))


@dataclass(frozen=True)
class Validity:
    """Whether a Gaussian is proper: every precision > ``floor`` and every number finite.

    Attributes
    ----------
    broken
        Parameter name -> number of broken entries (only parameters with some).
    numel
        Total number of entries.
    min_prec
        The smallest precision found.
    floor
        The threshold used.
    fallback
        ``None`` when nothing was repaired, else how broken entries were replaced.
    """

    broken: dict[str, int]
    numel: int
    min_prec: float
    floor: float
    fallback: str | None = None

    @property
    def ok(self) -> bool:
        return not self.broken

    @property
    def total_broken(self) -> int:
        return sum(self.broken.values())

    def describe(self) -> str:
        if self.ok:
            return f"valid Gaussian (all {self.numel} precisions > {self.floor:g}; min {self.min_prec:.4g})"
        parts = ", ".join(f"{k}: {v}" for k, v in self.broken.items())
        msg = (f"{self.total_broken} of {self.numel} entries have precision <= {self.floor:g} or are not finite "
               f"(min precision {self.min_prec:.4g}; by parameter: {parts})")
        return msg + (f"; fallback: {self.fallback}" if self.fallback else "")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "broken": self.broken, "total_broken": self.total_broken, "numel": self.numel,
                "min_prec": self.min_prec, "floor": self.floor, "fallback": self.fallback}


def _broken_masks(g: DiagGaussian, floor: float) -> dict[str, Tensor]:
    return {k: ~(g.prec[k] > floor) | ~torch.isfinite(g.prec[k]) | ~torch.isfinite(g.eta[k]) for k in g.prec}


def check_gaussian(g: DiagGaussian, floor: float = 0.0) -> Validity:
    """Count the entries of ``g`` whose precision is ≤ ``floor`` or that are not finite, per parameter."""
    masks = _broken_masks(g, floor)
    broken = {k: int(m.sum()) for k, m in masks.items() if bool(m.any())}
    finite = [s[torch.isfinite(s)] for s in g.prec.values()]
    mins = [float(s.min()) for s in finite if s.numel()]
    return Validity(broken=broken, numel=g.numel(), min_prec=min(mins) if mins else math.nan, floor=float(floor))


def repair_gaussian(g: DiagGaussian, reference: DiagGaussian, prior_prec: float, floor: float = 0.0) -> DiagGaussian:
    """Replace the broken entries of ``g`` by precision δ = ``prior_prec`` at the mean of ``reference``.

    Entry i with sᵢ ≤ ``floor`` (or not finite) becomes (ηᵢ, sᵢ) = (δ·m_ref,ᵢ, δ): the prior's precision, the
    trained posterior's mean.  Valid entries are untouched.  ``reference`` must be a proper Gaussian.
    """
    check_same_layout(g.eta, reference.eta, "repair_gaussian")
    m_ref = reference.mean()
    masks = _broken_masks(g, floor)
    eta, prec = {}, {}
    for k in g.eta:
        delta = torch.full_like(g.prec[k], float(prior_prec))
        prec[k] = torch.where(masks[k], delta, g.prec[k])
        eta[k] = torch.where(masks[k], delta * m_ref[k].to(g.eta[k].dtype), g.eta[k])
    return DiagGaussian(eta, prec)


def kl_diag(q: DiagGaussian, p: DiagGaussian) -> float:
    r"""KL(q ‖ p) of two diagonal Gaussians, in nats (float64).

    .. math:: \mathrm{KL} = \tfrac12 \sum_i \left[ \frac{s_{p,i}}{s_{q,i}} + s_{p,i}(m_{q,i} - m_{p,i})^2 - 1
              + \log\frac{s_{q,i}}{s_{p,i}} \right]

    with precisions s and means m; both must be proper (precision > 0).
    """
    check_same_layout(q.eta, p.eta, "kl_diag")
    mq, mp = q.to(dtype=torch.float64).mean(), p.to(dtype=torch.float64).mean()
    total = 0.0
    for k in mq:
        sq, sp = q.prec[k].double(), p.prec[k].double()
        r = sp / sq
        total += float(0.5 * (r + sp * (mq[k] - mp[k]) ** 2 - 1.0 - torch.log(r)).sum())
    return total


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their average rank (as ``scipy.stats.rankdata(method='average')``)."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (average-tie) ranks; NaN if one is constant."""
    a, b = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {a.size} and {b.size}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def deltas(new: Mapping[str, float], old: Mapping[str, float]) -> dict[str, float]:
    """new − old for every metric present in both."""
    return {k: float(new[k]) - float(old[k]) for k in new if k in old}


# ============================================================================================ removal
@dataclass
class Removal:
    """λ₋S and how it was formed.

    Attributes
    ----------
    posterior
        The what-if posterior (repaired if the raw one was invalid and fallback was allowed).
    raw
        λ − Σ_{k∈S} ĝₖ before any repair.
    validity
        The check of ``raw`` (with ``fallback`` set when ``posterior`` was repaired).
    slots
        The removed clients as rule slots; ``missing`` those that had no contribution (never replied).
    estimator
        The name of the contribution estimator used.
    """

    posterior: DiagGaussian
    raw: DiagGaussian
    validity: Validity
    slots: list[int]
    missing: list[int]
    estimator: str


def _prior_prec(rule: Algorithm) -> float:
    delta = getattr(rule.config, "prior_prec", None)
    if delta is None:
        raise UnsupportedAlgorithmError(f"'{rule.name}' has no prior precision (prior-prec)")
    return float(delta)


def posterior_without(
    rule: Algorithm,
    slots: Iterable[int],
    *,
    estimator: str | None = None,
    fallback: bool = True,
    floor: float | None = None,
) -> Removal:
    """The global posterior of ``rule`` without the clients in ``slots``: λ₋S = λ − Σ_{k∈S} ĝₖ.

    Parameters
    ----------
    rule
        A supported rule (:func:`supported_algorithms`) with its state loaded.
    slots
        Rule slots of the clients to remove (in a run without excluded clients, slot = client id).
    estimator
        Contribution estimator (:data:`ESTIMATORS`; default the algorithm's first).
    fallback
        Repair broken entries by flooring at the prior precision (:func:`repair_gaussian`); if False an
        invalid λ₋S raises :class:`InvalidPosteriorError` naming the parameters and counts.
    floor
        Precisions ≤ this are broken (default: the rule's ``min-prec``).

    Raises
    ------
    WhatIfError
        A slot out of range, an unsupported algorithm or an invalid posterior without fallback.
    """
    slots = sorted(set(int(s) for s in slots))
    bad = [s for s in slots if not 0 <= s < rule.K]
    if bad:
        raise WhatIfError(f"client slot(s) {bad} out of range [0, {rule.K})")
    name, fn = _estimator(rule.name, estimator)
    contributions = fn(rule)
    glob = rule.global_posterior()
    if glob is None:
        raise UnsupportedAlgorithmError(f"'{rule.name}' has no global posterior")
    raw = remove_contributions(glob, contributions, slots)
    thr = rule.config.min_prec if floor is None else float(floor)
    validity = check_gaussian(raw, thr)
    posterior = raw
    if not validity.ok:
        if not fallback:
            raise InvalidPosteriorError(f"removing slot(s) {slots} from {rule.name} leaves an improper Gaussian: "
                                        f"{validity.describe()}; allow the fallback (floor at the prior precision) "
                                        f"or remove fewer clients")
        delta = _prior_prec(rule)
        posterior = repair_gaussian(raw, rule.floor(glob), delta, thr)
        validity = Validity(validity.broken, validity.numel, validity.min_prec, validity.floor,
                            fallback=f"broken entries set to the prior precision {delta:g} at the trained mean")
    missing = [s for s in slots if s not in contributions]
    return Removal(posterior, raw, validity, slots, missing, name)


# ============================================================================================ runs on disk
def build_federation(
    exp: Experiment, out_dir: Path | None = None, data_dir: Path | None = None, *, compact: bool = False
) -> tuple[Federation, list[int]]:
    """:meth:`Federation.build` and the active clients (those not in ``exclude-clients``).

    ``compact=False`` is the engine's layout: rule slot = client id over all K (the rule's ``active`` list
    leaves excluded clients out of every average and of K).  ``compact=True`` rebuilds the rule over the
    K' = K − |excluded| active clients (slot j ↔ client ``active[j]``).
    """
    fed = Federation.build(exp, out_dir, data_dir)
    excluded = set(exp.run.exclude_clients)
    active = [c for c in range(exp.run.num_clients) if c not in excluded]
    if compact and len(active) != exp.run.num_clients:
        template = {k: v.detach() for k, v in fed.model.named_parameters()}
        store = fed.rule.store if isinstance(fed.rule.store, DiskStore) else None
        fed.rule = exp.algorithm_cls(template, len(active), exp.algo, store=store)
    return fed, active


@dataclass
class LoadedRun:
    """A finished (or checkpointed) run: its config, checkpoint meta and federation with the state loaded.

    The rule has the engine's layout (slot = client id); ``active`` lists the clients not excluded.
    """

    path: Path
    exp: Experiment
    meta: dict[str, Any]
    fed: Federation
    active: list[int]
    _full: dict[str, float] = field(default_factory=dict)

    @property
    def rule(self) -> Algorithm:
        return self.fed.rule

    @property
    def round(self) -> int:
        return int(self.meta["round"])

    @property
    def algorithm(self) -> str:
        return self.exp.run.algorithm

    @property
    def excluded(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.exp.run.exclude_clients)))

    def slots(self, clients: Iterable[int]) -> list[int]:
        """Validate client ids (partition ids) for removal and return them as rule slots (sorted, unique)."""
        ids = sorted(set(int(c) for c in clients))
        if not ids:
            raise WhatIfError("no client given to remove")
        unknown = [c for c in ids if c not in self.active]
        if unknown:
            why = [c for c in unknown if c in self.excluded]
            extra = f" (already excluded from this run: {why})" if why else ""
            raise WhatIfError(f"unknown client id(s) {unknown}{extra}; this run's clients are {self.active}")
        if set(ids) >= set(self.active):
            raise WhatIfError(f"cannot remove every client {self.active}: nothing would remain")
        return ids

    def posterior(self) -> DiagGaussian:
        """The trained global posterior λ (unfloored, as the rule keeps it)."""
        g = self.rule.global_posterior()
        if g is None:
            raise UnsupportedAlgorithmError(f"'{self.algorithm}' has no global posterior")
        return g

    def full_metrics(self) -> dict[str, float]:
        """The trained posterior's test metrics (computed once; equal to the last evaluated round's)."""
        if not self._full:
            self._full.update(self.evaluate(self.posterior()))
        return dict(self._full)

    def evaluate(self, posterior: DiagGaussian) -> dict[str, float]:
        return evaluate_posterior(self.fed, self.exp, posterior, self.round, self.rule.config.min_prec)

    def num_examples(self, client: int) -> int:
        return len(self.fed.parts[client])


def parse_clients(spec: str | Iterable[int]) -> list[int]:
    """``"3,5"`` or ``[3, 5]`` -> ``[3, 5]`` (sorted, unique), with a clear error for non-integers."""
    if isinstance(spec, str):
        items: list[Any] = [p for p in spec.split(",") if p.strip()]
    else:
        items = list(spec)
    try:
        out = sorted({int(str(p).strip()) for p in items})
    except ValueError:
        raise WhatIfError(f"client ids must be integers like '3' or '3,5', got {spec!r}") from None
    if not out:
        raise WhatIfError("no client given")
    return out


def load_run(run_dir: str | Path, *, data_dir: Path | None = None) -> LoadedRun:
    """Read a run folder (verified checkpoint), rebuild its federation and load the rule's state.

    Nothing is written; the source folder is only read.  Raises :class:`UnsupportedAlgorithmError` for point
    algorithms (before loading data) and :class:`~fedbayes.results.CheckpointError` for a missing/corrupt one.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise WhatIfError(f"run folder {path} does not exist")
    meta, state = load_checkpoint(path)
    exp = resolve(meta["config"])
    check_supported(exp.run.algorithm)
    fed, active = build_federation(exp, None, data_dir)
    fed.rule.load_state_tensors(state)
    return LoadedRun(path, exp, meta, fed, active)


def evaluate_posterior(
    fed: Federation, exp: Experiment, posterior: DiagGaussian, server_round: int, min_prec: float = 1e-8
) -> dict[str, float]:
    """Test metrics of ``posterior`` exactly as the engine evaluates the global one in ``server_round``.

    The mean prediction uses m = η/s after flooring s at ``min_prec``; the BMA uses ``bma-samples`` draws with
    the engine's seed (seed·7919 + round), so a what-if posterior and the trained one see the same noise.
    """
    assert fed.x_test is not None and fed.y_test is not None
    post = posterior.to(dtype=torch.float64).clamp_prec(min_prec)
    return evaluate_model(
        fed.model, post.mean(), fed.x_test, fed.y_test, fed.data.task, posterior=post,
        samples=exp.run.bma_samples, noise_var=exp.run.noise_var or 1.0, seed=exp.run.seed * 7919 + server_round,
        device=fed.device, predictive=exp.run.bma_predictive, scale=exp.run.bma_scale,
        logit_samples=exp.run.bma_logit_samples,
    )


# ============================================================================================ retraining
def run_federation(
    flat: Mapping[str, Any] | Experiment,
    out_dir: str | Path | None,
    *,
    stop_round: int | None = None,
    data_dir: Path | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], Federation]:
    """Train from scratch a federation in which the ``exclude-clients`` never existed; returns (rows, federation).

    This is the engine's own loop (:func:`fedbayes.engine.run_rounds`): same data, partition (over all K),
    model initialisation, participants and per-client seeds as :func:`fedbayes.engine.run_experiment`; the
    rule counts only the active clients (``Algorithm.active``), so excluded clients are in no average, sum or
    K.  ``stop_round`` stops early while keeping the configured ``rounds`` (the cosine learning-rate schedule
    depends on it).  The folder (if any) gets ``config.json``, ``metrics.jsonl`` and ``posterior.safetensors``.
    """
    exp = flat if isinstance(flat, Experiment) else resolve(flat)
    out = Path(out_dir) if out_dir is not None else None
    fed = Federation.build(exp, out, data_dir)
    writer = ResultsWriter(out, exp.to_flat()) if out is not None else None
    rows = run_rounds(fed, exp, [], writer, stop_round=stop_round, progress=progress, checkpoint=False)
    return rows, fed


# ============================================================================================ forget
def forget_state(rule: Algorithm, slots: Iterable[int], new_global: DiagGaussian) -> dict[str, Tensor]:
    """The checkpoint state of ``rule`` (engine layout) with the clients in ``slots`` deleted and the global
    replaced by ``new_global``; every other server and client tensor is kept as it is."""
    removed = {int(s) for s in slots}
    server = dict(rule.server)
    server.update(gaussian_to("global", new_global.to(dtype=torch.float64)))
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


def architecture(exp: Experiment) -> dict[str, Any]:
    """What two runs must share to be combined: dataset and its input scale, model, hidden widths, activation
    and δ of λ₀."""
    r = exp.run
    return {"dataset": r.dataset, "raw-pixels": r.raw_pixels, "model": r.model, "hidden": list(r.hidden),
            "activation": r.activation, "prior-prec": getattr(exp.algo, "prior_prec", None)}


_PARTITION_KEYS = ("dataset", "train_fraction", "num_clients", "partition", "size_alpha", "class_alpha",
                   "classes_per_client", "per_class", "pool_clients", "seed")


def same_partition(a: LoadedRun, b: LoadedRun) -> bool:
    """Whether both runs split the same data the same way (so client ids name the same data)."""
    return all(getattr(a.exp.run, k) == getattr(b.exp.run, k) for k in _PARTITION_KEYS)


def check_compatible(a: LoadedRun, b: LoadedRun, what: str = "runs") -> list[str]:
    """Raise :class:`RunMismatchError` unless ``a`` and ``b`` share dataset, model, shapes and prior λ₀.

    Returns notes (e.g. that client disjointness cannot be checked because the partitions differ).  Runs on the
    same partition that share a client are rejected (its data would be counted twice).
    """
    arch_a, arch_b = architecture(a.exp), architecture(b.exp)
    diff = {k: (arch_a[k], arch_b[k]) for k in arch_a if arch_a[k] != arch_b[k]}
    if diff:
        raise RunMismatchError(f"{what} differ in {diff} ({a.path} vs {b.path}); they must share dataset, "
                               f"model and prior λ₀")
    ga, gb = a.rule.global_posterior(), b.rule.global_posterior()
    if ga is None or gb is None:
        raise UnsupportedAlgorithmError("both runs need a global posterior")
    try:
        check_same_layout(ga.eta, gb.eta, what)
    except ValueError as e:
        raise RunMismatchError(str(e)) from None
    notes = []
    if same_partition(a, b):
        both = sorted(set(a.active) & set(b.active))
        if both:
            raise RunMismatchError(f"client(s) {both} took part in both {a.path} and {b.path} (same partition): "
                                   f"their data would be counted twice; run them with disjoint exclude-clients")
    else:
        notes.append("the runs use different partitions: that their clients' data is disjoint cannot be checked")
    return notes


def merge(a: LoadedRun, b: LoadedRun, *, fallback: bool = True) -> tuple[DiagGaussian, Validity, list[str]]:
    """λ = λ_A + λ_B − λ₀ for two compatible runs (:func:`check_compatible`); validity-checked and repaired
    like :func:`posterior_without` (broken entries -> prior precision at the mean of λ_A + λ_B)."""
    notes = check_compatible(a, b)
    prior = a.rule.prior0(_prior_prec(a.rule))
    ga, gb = a.rule.global_posterior(), b.rule.global_posterior()
    assert ga is not None and gb is not None
    merged = merge_posteriors([ga, gb], prior)
    floor = a.rule.config.min_prec
    validity = check_gaussian(merged, floor)
    if not validity.ok:
        if not fallback:
            raise InvalidPosteriorError(f"the merged posterior is improper: {validity.describe()}")
        ref = (a.rule.floor(ga) + b.rule.floor(gb)).clamp_prec(floor)
        merged = repair_gaussian(merged, ref, _prior_prec(a.rule), floor)
        validity = Validity(validity.broken, validity.numel, validity.min_prec, validity.floor,
                            fallback=f"broken entries set to the prior precision {_prior_prec(a.rule):g}")
    return merged, validity, notes
