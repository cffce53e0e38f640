r"""λ₋S = λ − Σ_{k∈S} ĝₖ: each rule's client contributions, their removal, and the validity of the answer.

**Valid by construction: the bounded step back.**  Removing data can leave no coordinate less certain than the
prior, so the answer keeps every precision ≥ δ (the prior λ₀'s): per coordinate i,

.. math::  λ_{-S,i} = λ_i - β_i ĝ_i, \qquad β_i = \max\{β ∈ [0, 1] : s_i - β\, ĝ^{s}_i ≥ δ\}

(ĝ = Σ_{k∈S} ĝₖ, ĝˢ its precision part): βᵢ = 1 wherever the full step keeps sᵢ ≥ δ (always, in exact
arithmetic, for the site rules, whose sites are ≥ 0), βᵢ = (sᵢ − δ)/ĝˢᵢ where it would not (the step stops where
the coordinate reaches the prior's precision), and βᵢ = 0 where the trained global is already below δ there (a
bayes-admm global can be).

**A damped coordinate keeps the trained mean** (mᵢ = ηᵢ/sᵢ) at its bounded precision: η₋S,ᵢ = mᵢ·s₋S,ᵢ.  The
contribution there claims more certainty than the global holds, so it cannot be trusted for the location either,
and moving η by βᵢĝᵢ^η would divide what the other clients' linear terms leave by a precision near δ: on the
class-per-client federation (docs/whatif.md) that sent 40 coordinates' means to 2·10⁴ (trained: < 0.4), made the
answer predict a single class, and made refinement from it and a resumed ``forget`` run diverge.  Removing what
the estimator cannot account for lowers certainty and never moves the estimate.  How many coordinates were
damped, and by how much, is reported with every answer (:class:`StepBack`); ``fallback=False`` refuses a removal
that needs any damping instead (:class:`InvalidPosteriorError`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedbayes.algorithms import REGISTRY, Algorithm
from fedbayes.gaussian import DiagGaussian, check_same_layout

__all__ = [
    "InvalidPosteriorError", "Removal", "RunMismatchError", "StepBack", "UnsupportedAlgorithmError", "Validity",
    "WhatIfError", "bounded_step_back", "check_gaussian", "check_supported", "client_contributions", "estimators",
    "merge_posteriors", "posterior_without", "prior_precision", "repair_gaussian",
    "supported_algorithms", "total_contribution",
]


class WhatIfError(ValueError):
    """An invalid what-if request (reported before anything is written)."""


class UnsupportedAlgorithmError(WhatIfError):
    """The run's algorithm keeps no per-client contributions (point algorithms)."""


class InvalidPosteriorError(WhatIfError):
    """λ₋S is not a valid Gaussian and no fallback is allowed."""


class RunMismatchError(WhatIfError):
    """Two runs that cannot be combined (model, shapes, prior or data differ)."""


# ============================================================================================ contributions
def supported_algorithms() -> list[str]:
    """The registered rules that keep per-client contributions (their ``removal_estimators``)."""
    return [name for name, cls in REGISTRY.items() if cls.removal_estimators]


def estimators(algorithm: str) -> tuple[str, ...]:
    """The contribution estimators of ``algorithm``, the default first (:class:`UnsupportedAlgorithmError` if
    it keeps none)."""
    check_supported(algorithm)
    return REGISTRY[algorithm].removal_estimators


def check_supported(algorithm: str) -> None:
    """Raise :class:`UnsupportedAlgorithmError` unless ``algorithm`` keeps per-client contributions."""
    if algorithm not in REGISTRY or not REGISTRY[algorithm].removal_estimators:
        raise UnsupportedAlgorithmError(
            f"algorithm '{algorithm}' keeps no per-client sites or duals (a point method or unknown), so a "
            f"client's contribution cannot be removed; what-if, influence, forget and merge support: "
            f"{', '.join(supported_algorithms())}"
        )


def _estimator(algorithm: str, estimator: str | None) -> str:
    table = estimators(algorithm)
    name = estimator if estimator is not None else table[0]
    if name not in table:
        raise WhatIfError(f"unknown estimator '{name}' for {algorithm}; valid: {list(table)}")
    return name


def client_contributions(rule: Algorithm, estimator: str | None = None) -> dict[int, DiagGaussian]:
    """Every client's contribution ĝₖ to ``rule``'s global posterior, keyed by rule slot (float64): the rule's own
    :meth:`~fedbayes.algorithms.Algorithm.contributions`."""
    return rule.contributions(_estimator(rule.name, estimator))


# ============================================================================================ pure algebra
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


# ============================================================================================ removal
@dataclass(frozen=True)
class StepBack:
    """How λ₋S = λ − β⊙ĝ was bounded (module docstring): βᵢ ∈ [0, 1], the largest keeping sᵢ ≥ ``bound``.

    Attributes
    ----------
    bound
        The precision every coordinate keeps (δ, the prior's).
    numel
        Coordinates in all.
    damped
        Coordinates with βᵢ < 1 (by parameter in ``by_param``); ``zeroed`` those with βᵢ = 0.
    beta_min, beta_mean
        The smallest βᵢ and the mean βᵢ over all coordinates (1.0 when nothing was damped).
    """

    bound: float
    numel: int
    damped: int
    zeroed: int
    beta_min: float
    beta_mean: float
    by_param: dict[str, int]

    @property
    def full(self) -> bool:
        """Whether the whole contribution was removed (no coordinate damped)."""
        return self.damped == 0

    def describe(self) -> str:
        if self.full:
            return f"full step back (every precision stays >= {self.bound:g})"
        parts = ", ".join(f"{k}: {v}" for k, v in self.by_param.items())
        return (f"bounded step back: {self.damped} of {self.numel} coordinates damped to keep precision >= "
                f"{self.bound:g} ({self.zeroed} not moved at all; min beta {self.beta_min:.3g}, mean beta "
                f"{self.beta_mean:.6f}; by parameter: {parts})")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "bounded step back: λ − β⊙ĝ, β the largest in [0, 1] keeping every precision >= bound",
                "bound": self.bound, "numel": self.numel, "damped": self.damped, "zeroed": self.zeroed,
                "beta_min": self.beta_min, "beta_mean": self.beta_mean, "by_param": self.by_param}


_ROUNDING = 1e-12
"""Relative slack below ``bound`` still counted as reaching it (float64 round-off of a full site step back)."""


def bounded_step_back(posterior: DiagGaussian, contribution: DiagGaussian, bound: float
                      ) -> tuple[DiagGaussian, StepBack]:
    """λ − β⊙ĝ with βᵢ the largest in [0, 1] that keeps sᵢ − βᵢĝˢᵢ ≥ ``bound``, a damped coordinate (βᵢ < 1) at
    the trained mean (float64; module docstring)."""
    check_same_layout(posterior.eta, contribution.eta, "bounded_step_back")
    lam, g = posterior.to(dtype=torch.float64), contribution.to(dtype=torch.float64)
    eta, prec, by_param = {}, {}, {}
    numel = damped = zeroed = 0
    beta_min, beta_sum = 1.0, 0.0
    for k in lam.prec:
        s, gs = lam.prec[k], g.prec[k]
        full = s - gs
        short = (full < bound * (1 - _ROUNDING)) | ~torch.isfinite(full)
        ratio = torch.where(gs > 0, (s - bound) / torch.where(gs > 0, gs, torch.ones_like(gs)), torch.ones_like(s))
        beta = torch.where(short, ratio.clamp(0.0, 1.0).nan_to_num(0.0), torch.ones_like(s))
        prec[k] = torch.where(short, torch.maximum(s - beta * gs, torch.minimum(s, torch.full_like(s, bound))), full)
        mean = lam.eta[k] / torch.where(s != 0, s, torch.ones_like(s))
        eta[k] = torch.where(short, mean * prec[k], lam.eta[k] - g.eta[k])
        n = int((beta < 1).sum())
        if n:
            by_param[k] = n
            beta_min = min(beta_min, float(beta.min()))
        damped += n
        zeroed += int((beta == 0).sum())
        numel += beta.numel()
        beta_sum += float(beta.sum())
    step = StepBack(float(bound), numel, damped, zeroed, beta_min, beta_sum / max(numel, 1), by_param)
    return DiagGaussian(eta, prec), step


@dataclass
class Removal:
    """λ₋S and how it was formed.

    Attributes
    ----------
    posterior
        The what-if posterior: the bounded step back (module docstring).
    raw
        λ − Σ_{k∈S} ĝₖ, the full step.
    validity
        The check of ``raw`` against the bound (every precision ≥ δ and finite); ``fallback`` says how
        ``posterior`` differs from it when it does.
    step
        The step back's report (coordinates damped, β).
    slots
        The removed clients as rule slots (each took part: removing one that never did is an error).
    estimator
        The name of the contribution estimator used.
    """

    posterior: DiagGaussian
    raw: DiagGaussian
    validity: Validity
    step: StepBack
    slots: list[int]
    estimator: str


def prior_precision(rule: Algorithm) -> float:
    delta = getattr(rule.config, "prior_prec", None)
    if delta is None:
        raise UnsupportedAlgorithmError(f"'{rule.name}' has no prior precision (prior-prec)")
    return float(delta)


def total_contribution(rule: Algorithm, contributions: Mapping[int, DiagGaussian], slots: Iterable[int]
                       ) -> DiagGaussian:
    """ĝ = Σ_{k∈S} ĝₖ (a client without a contribution, one that never replied, adds nothing)."""
    total = rule.flat_prior()
    for c in slots:
        if c in contributions:
            total = total + contributions[c].to(dtype=total.dtype)
    return total


def posterior_without(
    rule: Algorithm,
    slots: Iterable[int],
    *,
    estimator: str | None = None,
    fallback: bool = True,
    bound: float | None = None,
) -> Removal:
    """The global posterior of ``rule`` without the clients in ``slots``: λ₋S = λ − β⊙Σ_{k∈S} ĝₖ, the bounded
    step back (module docstring).

    Parameters
    ----------
    rule
        A supported rule (:func:`supported_algorithms`) with its state loaded.
    slots
        Rule slots of the clients to remove (in a run without excluded clients, slot = client id).
    estimator
        Contribution estimator (the rule's ``removal_estimators``; default its first).
    fallback
        Allow the bounded step back; if False, a removal that would need it (a precision below ``bound``, or
        not finite) raises :class:`InvalidPosteriorError` naming the parameters and counts.
    bound
        The precision every coordinate keeps (default: δ, the prior's precision).

    Raises
    ------
    WhatIfError
        A slot out of range, an unsupported algorithm or, without fallback, a removal that needs damping.
    """
    slots = sorted(set(int(s) for s in slots))
    bad = [s for s in slots if not 0 <= s < rule.K]
    if bad:
        raise WhatIfError(f"client slot(s) {bad} out of range [0, {rule.K})")
    name = _estimator(rule.name, estimator)
    contributions = rule.contributions(name)
    glob = rule.global_posterior()
    if glob is None:
        raise UnsupportedAlgorithmError(f"'{rule.name}' has no global posterior")
    glob = glob.to(dtype=torch.float64)
    missing = [s for s in slots if s not in contributions]
    if missing:
        raise WhatIfError(f"client(s) {missing} never took part (no reply of theirs was ever aggregated): "
                          f"there is nothing of theirs to remove")
    total = total_contribution(rule, contributions, slots)
    raw = glob - total
    thr = prior_precision(rule) if bound is None else float(bound)
    validity = check_gaussian(raw, thr * (1 - _ROUNDING))
    posterior, step = bounded_step_back(glob, total, thr)
    if not step.full:
        if not fallback:
            raise InvalidPosteriorError(f"removing slot(s) {slots} from {rule.name} would leave precisions below the "
                                        f"prior's {thr:g}: {validity.describe()}; allow the bounded step back or "
                                        f"remove fewer clients")
        validity = Validity(validity.broken, validity.numel, validity.min_prec, validity.floor,
                            fallback=step.describe())
    return Removal(posterior, raw, validity, step, slots, name)
