"""Bayes-ADMM / IVON-ADMM (Möllenhoff, Swaroop, Doshi-Velez, Khan, "Federated ADMM from Bayesian Duality",
arXiv 2506.13150, ICLR 2026).

Duals live in natural parameters: λ̂ₖ = (v̂ₖ, V̂ₖ).  Client k solves

    qₖ = argmin_q  τ⁻¹E_q[Nₖℓ̄ₖ] + ⟨λ̂ₖ, μ(q)⟩ + ρ·KL(q ‖ q̄)

Dividing by ρ, this is the universal local problem with ess = Nₖ/(τρ) and the prior πₖ = λ̄ − λ̂ₖ/ρ (one
Gaussian factor; its "precision" S̄ − V̂ₖ/ρ may be negative, which IVON handles because it starts at q̄ with
h + δ = S̄/ess > 0).  The server rebuilds λₖ = πₖ + λ̃ₖ from the site and updates, for k ∈ S,

    λ̂ₖ ← λ̂ₖ + γρ(λₖ − λ̄)
    λ̄  ← (1 − α)·(1/K)Σₖ λₖ + α(λ₀ + Σₖ λ̂ₖ),       α = 1/(1 + ρK) by default

over all K clients of the federation (absent ones keep their last λₖ and λ̂ₖ; never-seen ones count as
λₖ = λ₀, λ̂ₖ = 0; excluded ones not at all).  The global precision is floored at ``min-prec`` (the paper
has no positivity safeguard).  **Safe prior** (``safe-prior``, on by default; not in the paper): where the
sent prior's precision S̄ − V̂ₖ/ρ falls below δ, that coordinate gets N(m̄, 1/δ) instead.  Noisy local
precisions (IVON's h from ~100 steps, scaled by ess = Nₖ/(τρ)) drive the dual integrator V̂ₖ past S̄ in a few
coordinates after tens of rounds; a negative prior precision makes the local problem unbounded below and
IVON diverges (observed on fmnist-10-het with ρ = 1, γ = 0.01: 2 of 3 seeds at rounds 32–34).  The server
rebuilds λₖ from the prior it actually sent, so the rule stays consistent.
The reference code uses the opposite dual sign and adds the dual precision
inside IVON's h-EMA; putting it into the prior is exact and immediate.  With α = ρ = γ = 1 this is undamped PVI.

Hyperparameters (reference, FMNIST 10 clients heterogeneous): δ = S₀ = 1, ρ = 0.2, γ = 1e-3, τ = 1e-3,
IVON lr 5e-5, h₀ 1e-3, β2 0.9998, 10 epochs, batch 32, cosine lr over rounds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from fedbayes.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientTask,
    ClientUpdate,
    gaussian_from,
    gaussian_to,
)
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["BayesADMM", "BayesADMMConfig"]


class BayesADMMConfig(AlgorithmConfig):
    prior_prec: float = Field(1.0, gt=0.0, description="S₀ = δ: precision of λ₀ = N(0, δ⁻¹I)")
    rho: float = Field(0.2, gt=0.0, description="ADMM penalty ρ (KL weight; ess = Nₖ/(τρ))")
    damping: float = Field(1.0, gt=0.0, le=1.0, description="dual damping γ")
    server_step: float | None = Field(None, gt=0.0, le=1.0, description="α; default 1/(1 + ρK)")
    safe_prior: bool = Field(True, description="floor the sent prior's precision at δ (see the module docstring)")


class BayesADMM(Algorithm):
    name: ClassVar[str] = "bayes-admm"
    summary: ClassVar[str] = "IVON-ADMM: duals in natural parameters (Möllenhoff et al. 2025)"
    bayesian: ClassVar[bool] = True
    Config = BayesADMMConfig
    config: BayesADMMConfig
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "ivon"}

    @property
    def alpha(self) -> float:
        a = self.config.server_step
        return a if a is not None else 1.0 / (1.0 + self.config.rho * len(self.active))

    def init_state(self, init_mean: Params) -> None:
        self.server = {**gaussian_to("global", self.prior0(self.config.prior_prec))}
        self.server.update({f"start/{k}": v for k, v in init_mean.items()})

    def global_posterior(self) -> DiagGaussian:
        g = gaussian_from("global", self.server, self.names)
        assert g is not None
        return g

    def global_mean(self) -> Params:
        return self.floor(self.global_posterior()).mean()

    def _prior_for(self, client: int) -> DiagGaussian:
        prior = self.global_posterior() - self.client_site(client, "dual").scale(1.0 / self.config.rho)
        if not self.config.safe_prior:
            return prior
        # where S̄ − V̂ₖ/ρ < δ, send N(m̄, 1/δ) instead: a prior with (near-)negative precision makes the local
        # problem unbounded below and IVON diverges (seen on fmnist-10-het, seed 0, round 32).
        floor = self.config.prior_prec
        m_bar = self.global_mean()
        low = {k: prior.prec[k] < floor for k in self.names}
        return DiagGaussian(
            {k: torch.where(low[k], floor * m_bar[k], prior.eta[k]) for k in self.names},
            {k: prior.prec[k].clamp_min(floor) for k in self.names},
        )

    def configure(self, client: int, server_round: int) -> ClientTask:
        glob = self.floor(self.global_posterior())
        start = {k: self.server[f"start/{k}"] for k in self.names} if server_round <= 1 else glob.mean()
        return ClientTask(
            prior=self._prior_for(client),
            start_mean=start,
            start_prec=glob.prec,
            overrides={"ess_scale": self.config.rho},
        )

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> None:
        self.check_updates(updates)  # FIX: validate all replies before touching state (base.check_updates)
        rho, gamma = self.config.rho, self.config.damping
        glob = self.global_posterior()
        lam0 = self.prior0(self.config.prior_prec)
        for u in updates:
            self.check_update(u, need_site=True)
            assert u.site is not None
            post = self._prior_for(u.client) + u.site.to(dtype=glob.dtype)  # λₖ = πₖ + λ̃ₖ
            dual = self.client_site(u.client, "dual") + (post - glob).scale(gamma * rho)
            self.store.put_all(u.client, {**gaussian_to("dual", dual), **gaussian_to("post", post)})
        mean_post = self.flat_prior()
        dual_sum = self.flat_prior()
        for c in self.active:
            d = self.store.get_all(c)
            post_c = gaussian_from("post", d, self.names)
            mean_post = mean_post + (post_c if post_c is not None else lam0).scale(1.0 / len(self.active))
            dual_c = gaussian_from("dual", d, self.names)
            if dual_c is not None:
                dual_sum = dual_sum + dual_c
        a = self.alpha
        new = mean_post.scale(1 - a) + (lam0 + dual_sum).scale(a)
        self.server.update(gaussian_to("global", self.floor(new)))
