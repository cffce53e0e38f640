"""λ₋S = λ − Σ_{k∈S} ĝₖ: each rule's client contributions, their removal, and the validity of the answer."""

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
    "InvalidPosteriorError", "Removal", "RunMismatchError", "UnsupportedAlgorithmError", "Validity", "WhatIfError",
    "check_gaussian", "check_supported", "client_contributions", "estimators", "merge_posteriors",
    "posterior_without", "prior_precision", "remove_contributions", "repair_gaussian", "supported_algorithms",
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


def prior_precision(rule: Algorithm) -> float:
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
        Contribution estimator (the rule's ``removal_estimators``; default its first).
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
    name = _estimator(rule.name, estimator)
    contributions = rule.contributions(name)
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
        delta = prior_precision(rule)
        posterior = repair_gaussian(raw, rule.floor(glob), delta, thr)
        validity = Validity(validity.broken, validity.numel, validity.min_prec, validity.floor,
                            fallback=f"broken entries set to the prior precision {delta:g} at the trained mean")
    missing = [s for s in slots if s not in contributions]
    return Removal(posterior, raw, validity, slots, missing, name)
