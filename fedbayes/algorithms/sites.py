"""Damped-site rules shared by FedLap-Cov and PVI (partitioned variational inference).

Global posterior λ_g = λ₀ + Σₖ λ̃ₖ over all K clients; client k gets its cavity λ₋ₖ = λ_g − λ̃ₖ and returns a
new site λ̃ₖ_new = qₖ / λ₋ₖ (computed directly by the local trainer); the server damps:

    λ̃ₖ ← (1 − ρ) λ̃ₖ + ρ λ̃ₖ_new        for k ∈ S,        λ_g ← λ₀ + Σ_{k=1..K} λ̃ₖ

with λ₀ = N(0, δ⁻¹I).  Precisions of the global and of cavities are floored at ``min-prec`` before use (site
precisions are ≥ 0, so cavities are at least λ₀ in exact arithmetic).

Σₖ λ̃ₖ is kept running (:class:`SiteState`): a round adds its participants' site changes, so it costs O(|S|·P)
whatever K; every ``RECOMPUTE_EVERY`` rounds, and whenever it is unset (a fresh rule, an older checkpoint,
``fedbayes forget``), it is recomputed from the stored sites, which bounds the float64 drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import Field

from fedbayes.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientTask,
    ClientUpdate,
    PosteriorState,
    recompute_due,
)
from fedbayes.algorithms.state import DERIVED, State
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["SiteClient", "SiteConfig", "SiteRule", "SiteState"]


@dataclass(frozen=True)
class SiteState(PosteriorState):
    """λ_g and the round-1 start (:class:`PosteriorState`), and the running sum Σ_{k∈active} λ̃ₖ."""

    site_sum: DiagGaussian | None = field(default=None, metadata=DERIVED)


@dataclass(frozen=True)
class SiteClient(State):
    site: DiagGaussian | None = None
    """λ̃ₖ, the damped site the global sums (none: a client never heard from, a zero site)."""


class SiteConfig(AlgorithmConfig):
    """δ and the site damping ρ (each rule declares ``rho`` its own way: PVI a plain number, FedLap-Cov from K)."""

    prior_prec: float = Field(1.0, gt=0.0, description="δ: precision of the prior λ₀ = N(0, δ⁻¹I)")


class SiteRule(Algorithm[SiteState, SiteClient]):
    bayesian: ClassVar[bool] = True
    Config: ClassVar[type[AlgorithmConfig]] = SiteConfig
    config: SiteConfig
    warm_start_prec: ClassVar[bool] = False
    removal_estimators: ClassVar[tuple[str, ...]] = ("site",)

    @property
    def rho(self) -> float:
        """The site damping used by :meth:`aggregate` (FedLap-Cov derives it from K)."""
        raise NotImplementedError

    def init_state(self, init_mean: Params) -> SiteState:
        return SiteState(posterior=self.prior0(self.config.prior_prec), start=init_mean)

    def global_posterior(self) -> DiagGaussian:
        return self.state.posterior

    def site(self, client: int) -> DiagGaussian:
        """λ̃ₖ (zero for a client never heard from)."""
        s = self.client(client).site
        return s if s is not None else self.flat_prior()

    def global_mean(self) -> Params:
        return self.floor(self.global_posterior()).mean()

    def configure(self, client: int, server_round: int) -> ClientTask:
        glob = self.floor(self.global_posterior())
        cavity = self.floor(glob - self.site(client))
        start = self.state.start if server_round <= 1 else glob.mean()
        # warm start at the global posterior (h₀ = site/ess exactly); round 1 has no evidence yet: hess-init
        warm = self.warm_start_prec and server_round > 1
        return ClientTask(prior=cavity, start_mean=start, start_prec=glob.prec if warm else None)

    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        rho = self.rho
        total = self.state.site_sum if self.state.site_sum is not None else self.recomputed_sum()
        for u in updates:
            assert u.site is not None  # checked by aggregate
            old = self.site(u.client)
            new = old.scale(1 - rho) + u.site.to(dtype=torch.float64).scale(rho)
            stored = self.set_client(u.client, SiteClient(site=new)).site
            assert stored is not None
            total = total + (stored - old)
        if recompute_due(server_round):
            total = self.recomputed_sum()
        self.state = self.state.replace(posterior=self.prior0(self.config.prior_prec) + total, site_sum=total)

    def recomputed_sum(self) -> DiagGaussian:
        """Σ_{k∈active} λ̃ₖ from the stored sites (an excluded client's stored site is not in the sum)."""
        total = self.flat_prior()
        for c in self.heard_from():
            site = self.client(c).site
            if site is not None:
                total = total + site
        return total

    def contributions(self, estimator: str) -> dict[int, DiagGaussian]:
        """``site``: ĝₖ = λ̃ₖ, the stored (damped) site.  The server keeps λ = λ₀ + Σₖ λ̃ₖ over all K (stale sites
        included), so λ₋S = λ₀ + Σ_{k∉S} λ̃ₖ up to rounding; site precisions are ≥ 0 (checked on the wire)."""
        if estimator != "site":
            raise ValueError(f"unknown estimator '{estimator}' for {self.name}; valid: {list(self.removal_estimators)}")
        out: dict[int, DiagGaussian] = {}
        for c in self.store.clients():
            g = self.client(c).site
            if g is not None:
                out[c] = g
        return out
