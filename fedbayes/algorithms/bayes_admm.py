"""Bayes-ADMM / IVON-ADMM (Möllenhoff, Swaroop, Doshi-Velez, Khan, "Federated ADMM from Bayesian Duality",
arXiv 2506.13150, ICLR 2026).

Duals live in natural parameters: λ̂ₖ = (v̂ₖ, V̂ₖ).  Client k solves

    qₖ = argmin_q  τ⁻¹E_q[Nₖℓ̄ₖ] + ⟨λ̂ₖ, μ(q)⟩ + ρ·KL(q ‖ q̄)

Dividing by ρ, this is the universal local problem with ess = Nₖ/(τρ) and the prior πₖ = λ̄ − λ̂ₖ/ρ (one
Gaussian factor; its "precision" S̄ − V̂ₖ/ρ may be negative, which IVON handles because it starts at q̄ with
h + δ = S̄/ess > 0).  The server rebuilds λₖ = πₖ + λ̃ₖ from the site and updates, for k ∈ S,

    λ̂ₖ ← λ̂ₖ + γρ(λₖ − λ̄)
    λ̄  ← (1 − α)·(1/|M|)Σ_{k∈M} λₖ + α(λ₀ + Σₖ λ̂ₖ),       α = 1/(1 + ρK) by default

where Σₖ runs over every client (absent ones keep their last λ̂ₖ; never-seen ones have λ̂ₖ = 0; excluded ones do
not count at all) and M is this round's participants S (``server-mean = participants``, the default) or H, every
client heard from so far with absent ones' last λₖ (``server-mean = heard``).  With full participation M = S = H
is all K clients from round 1 on: the paper's equation.

**Partial participation** (the papers run full participation only): the mean is over this round's participants while
α(λ₀ + Σₖ λ̂ₖ) keeps every client's dual, as FedDyn keeps every client's correction in h. Averaging over H instead
(the default until 2026-12-07) mixes each round's |S| fresh posteriors with K − |S| stale ones, so λ̄ moves by about
|S|/K of the full-participation step: with 10 of 100 clients a round, fmnist-10-het's tuned setting reached 0.873
(H) against 0.885 (S) on mnist-100-2class-transfer and 0.831 against 0.847 on fmnist-100-het-transfer (test, seed 0,
last 3 of 50 rounds; docs/results.md). The fixed point is the same (every λₖ = λ̄ there); S's mean is noisier in the
first rounds of a 2-class-per-client split, as FedAvg's and PVI's are.

**Why not count a never-seen client as λₖ = λ₀** (the form before H): under sparse participation that dilutes the
global precision by the share of clients heard from (after round 1 with 100 of 1,000 clients, S̄ ≈ 0.1 × a
participant's precision), and a fresh client, whose IVON starts at h₀ = (S̄ − s_π)/ess = 0 with δ = S̄/ess, then
takes steps ~10× larger than in the 10-client setting the presets were tuned in: on Fashion-MNIST with 1,000
clients, 100 per round (relu MLP, README "Thousands of clients") the global reached 0.61 test accuracy in round 1
and collapsed to chance in rounds 2–3 (local training loss 19 and 178); with the mean over H the same run reads
0.61, 0.63, 0.65 and 0.70 at round 10.

Σₖ λₖ and Σₖ λ̂ₖ are running sums in the global state
(:class:`ADMMState`), updated by the participants' changes, so a round costs O(|S|·P) whatever K; they are
recomputed from the client store every ``RECOMPUTE_EVERY`` rounds (bounding the float64 drift) and whenever
they are unset (a fresh rule, an older checkpoint, ``fedbayes forget``).

The client starts IVON exactly at the global posterior every round (h₀ = (S̄ − s_π)/ess, no floor; ``hess-init``
only in round 1, when the global is just λ₀), as the reference does.

**Sites are signed**, as in the paper: s̃ₖ = ess·h is sent unclamped, so λₖ = πₖ + s̃ₖ is IVON's posterior
precision ess·(h + δ) > 0 even where the noisy curvature estimate h is negative (clamping s̃ at 0 there, as PVI
does, added positive noise to ~40 % of the coordinates each round on fmnist-10-het and biased the duals).  A
reply is valid when the posterior it implies is proper (checked on arrival against the prior sent).

**Safeguards** (each counted per round in ``metrics.jsonl`` as ``guard_<name>``: coordinates touched):

* ``min-prec``: the global precision and each rebuilt λₖ are floored at ``min-prec`` (the paper has no
  positivity safeguard; λ̄ is a convex combination of proper λₖ plus α(λ₀ + Σλ̂ₖ), which may not be).
* ``safe-prior`` (``safe-prior``, on by default; not in the paper): where the sent prior's precision
  S̄ − V̂ₖ/ρ falls below δ, that coordinate gets N(m̄, 1/δ) instead.  A strongly negative prior precision
  makes the local problem unbounded below along that coordinate; with large IVON learning rates or a large
  dual step γ the dual V̂ₖ can overtake S̄ and a client diverges (a diverging client is a failed client for
  that round, it does not end the run).  The server rebuilds λₖ from the prior it actually sent, so the rule
  stays consistent.  The paper presets (``fmnist-10-*-paper``) turn it off to run the reference algorithm.
The reference code uses the opposite dual sign and adds the dual precision
inside IVON's h-EMA; putting it into the prior is exact and immediate.  With α = ρ = γ = 1 this is undamped PVI.

**ρ and K.** With Nₖ ≈ N/K, the pull of the global relative to a client's data is ρτ/Nₖ ∝ ρK, and α = 1/(1+ρK): both
depend on ρ only through ρK, which suggested giving ρ as ``rho-k`` = ρK (the default until 2026-12-07). Measured, ρ
itself transfers better: fmnist-10-het's tuned ρ = 0.229 kept at K = 25 and at K = 100 (10 a round) beat the same ρK
(ρ ten times smaller at K = 100) by 0.9 points (fmnist-25-hard), 2.2 (mnist-100-2class-transfer) and 1.3
(fmnist-100-het-transfer) with γ = 1 (test accuracy), and a per-split study on MNIST chose ρ = 0.25 at K = 100
(docs/results.md, "A Bayes-ADMM default that transfers"). A larger ρK moves α toward 0, so λ̄ leans on λ₀ + Σₖ λ̂ₖ,
the sum of the data terms (PVI's global), rather than on the mean of client posteriors that each see a few classes.
So the default is ρ = 0.2 at any K; ``rho-k`` (ρ = rho-k/K) stays as the tuner's dimension and the tuned presets'
key.

Hyperparameters (reference, FMNIST 10 clients heterogeneous): δ = S₀ = 1, ρ = 0.2, γ = 1e-3, τ = 1e-3,
IVON lr 5e-5, h₀ 1e-3, β2 0.9998, 10 epochs, batch 32, cosine lr over rounds.

**Defaults** (no preset): γ = 1, ρ = 0.2 at any K, δ = 1, the participants' mean.  γ = 1 held on every split it
was tried on: against fmnist-10-het's tuned γ = 0.283 it gained 0.1 there (test), 2.1 on fmnist-25-hard (test) and
1.0 on mnist-100-2class-transfer (test, mean over H).  The local (IVON) settings are the optimiser's defaults, not
the MLP's tuned ones, which fail on a CNN.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from fedbayes.algorithms.base import Algorithm, ClientTask, ClientUpdate, KScaledRho, PosteriorState, recompute_due
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.algorithms.state import DERIVED, State
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["ADMMState", "BayesADMM", "BayesADMMConfig", "Client"]


@dataclass(frozen=True)
class ADMMState(PosteriorState):
    """λ̄ and the round-1 start (:class:`PosteriorState`), and the running sums of the server equation."""

    post_sum: DiagGaussian | None = field(default=None, metadata=DERIVED)
    """Σ_{k∈active} λₖ (λ₀ for a client never heard from)."""
    dual_sum: DiagGaussian | None = field(default=None, metadata=DERIVED)
    """Σ_{k∈active} λ̂ₖ."""


@dataclass(frozen=True)
class Client(State):
    dual: DiagGaussian | None = None
    """λ̂ₖ (zero for a client never heard from)."""
    post: DiagGaussian | None = None
    """λₖ = πₖ + λ̃ₖ, the client's last posterior (λ₀ for a client never heard from)."""
    site: DiagGaussian | None = None
    """λ̃ₖ as the client sent it (float64): ρλ̃ₖ is its data term at temperature τ, what removing it takes away
    (None in checkpoints written before sites were kept: their removal falls back to ``corrected-dual``)."""


class BayesADMMConfig(KScaledRho):
    prior_prec: float = Field(1.0, gt=0.0, description="S₀ = δ: precision of λ₀ = N(0, δ⁻¹I)")
    default_rho_k: ClassVar[float] = 2.0
    default_rho: ClassVar[float | None] = 0.2
    rho: float | None = Field(None, gt=0.0, description="ADMM penalty ρ (KL weight; ess = Nₖ/(τρ)); default 0.2 "
                              "(the reference's, at K = 10) at any K: it transferred across K better than ρK")
    rho_k: float | None = Field(None, gt=0.0, description="ρ·K, instead of rho (ρ = rho-k/K; the tuner's "
                                "dimension; presets tuned at K = 10 give it)")
    damping: float = Field(1.0, gt=0.0, le=1.0, description="dual damping γ")
    server_step: float | None = Field(None, gt=0.0, le=1.0, description="α; default 1/(1 + ρK)")
    safe_prior: bool = Field(True, description="floor the sent prior's precision at δ (see the module docstring)")
    signed_sites: bool = Field(True, description="send s̃ = ess·h unclamped (the paper); false: clamp s̃ ≥ 0 as PVI")
    server_mean: Literal["participants", "heard"] = Field(
        "participants", description="under partial participation, the server's mean of the λₖ: over this round's "
        "participants (as FedDyn) or over every client heard from, absent ones with their last λₖ (the default "
        "until 2026-12-07); the same with full participation")


class BayesADMM(Algorithm[ADMMState, Client]):
    name: ClassVar[str] = "bayes-admm"
    summary: ClassVar[str] = "IVON-ADMM: duals in natural parameters (Möllenhoff et al. 2025)"
    search_space: ClassVar[dict[str, Dim]] = {
        # around the reference's values (lr 5e-5, τ 1e-3, ρK 2, γ 1e-3, δ 1), each a decade or two either way.
        # lr and γ reach higher than the reference: on fmnist-10-het (validation, 50 rounds) lr 1e-3 beat 1e-4
        # and 3.7e-4 in accuracy (3e-3 diverges), and γ = 0.05 cut validation NLL from 0.57 to 0.49 against 4.5e-4.
        # γ reaches 1 (until 2026-12-07: 0.5): γ = 1 beat the tuned 0.283 on every split it was tried on.
        "lr": LogUniform(3e-5, 2e-3), "temperature": LogUniform(1e-4, 1e-2), "prior-prec": LogUniform(0.1, 10.0),
        "rho-k": LogUniform(0.5, 10.0), "damping": LogUniform(1e-3, 1.0),
    }
    bayesian: ClassVar[bool] = True
    signed_sites: ClassVar[bool] = True  # replies are checked as prior + site > 0 (also right for clamped sites)
    Config = BayesADMMConfig
    config: BayesADMMConfig
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "ivon"}
    # dual first: on fmnist-10-het (50 rounds, docs/whatif.md) it ranks clients as well as site (Spearman 0.96 on
    # Δ test NLL) with magnitudes 140× closer to retraining (MAE 0.53 vs 73; site's single last reply is noisy)
    removal_estimators: ClassVar[tuple[str, ...]] = ("dual", "site", "corrected-dual")

    @property
    def rho(self) -> float:
        """ρ for this federation (``rho``, or ``rho-k``/K with K the federation's size)."""
        return self.config.effective_rho(len(self.active))

    @property
    def alpha(self) -> float:
        a = self.config.server_step
        return a if a is not None else 1.0 / (1.0 + self.rho * len(self.active))

    def init_state(self, init_mean: Params) -> ADMMState:
        return ADMMState(posterior=self.prior0(self.config.prior_prec), start=init_mean)

    def global_posterior(self) -> DiagGaussian:
        return self.state.posterior

    def dual(self, client: int) -> DiagGaussian:
        """λ̂ₖ (zero for a client never heard from)."""
        d = self.client(client).dual
        return d if d is not None else self.flat_prior()

    def global_mean(self) -> Params:
        return self.floor(self.global_posterior()).mean()

    def _prior_for(self, client: int, count: bool = False) -> DiagGaussian:
        prior = self.global_posterior() - self.dual(client).scale(1.0 / self.rho)
        if not self.config.safe_prior:
            return prior
        # where S̄ − V̂ₖ/ρ < δ, send N(m̄, 1/δ) instead: a prior with (near-)negative precision makes the local
        # problem unbounded below and IVON diverges (seen on fmnist-10-het, seed 0, round 32).
        floor = self.config.prior_prec
        m_bar = self.global_mean()
        low = {k: prior.prec[k] < floor for k in self.names}
        if count:
            self.count_guard("safe-prior", sum(int(v.sum()) for v in low.values()))
        return DiagGaussian(
            {k: torch.where(low[k], floor * m_bar[k], prior.eta[k]) for k in self.names},
            {k: prior.prec[k].clamp_min(floor) for k in self.names},
        )

    def configure(self, client: int, server_round: int) -> ClientTask:
        glob = self.floor(self.global_posterior())
        first = server_round <= 1
        start = self.state.start if first else glob.mean()
        # IVON restarts at the global posterior (m̄, S̄) every round, h₀ = (S̄ − s_π)/ess exactly; in round 1
        # the global is only the prior (h₀ would be 0: σ² = 1/δ of sampling noise), so hess-init applies there.
        return ClientTask(
            prior=self._prior_for(client, count=True),
            start_mean=start,
            start_prec=None if first else glob.prec,
            overrides={"ess_scale": self.rho, "signed_site": self.config.signed_sites},
        )

    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        rho, gamma = self.rho, self.config.damping
        glob = self.global_posterior()
        lam0 = self.prior0(self.config.prior_prec)
        post_sum, dual_sum = self.state.post_sum, self.state.dual_sum
        if post_sum is None or dual_sum is None:
            post_sum, dual_sum = self.recomputed_sums()
        fresh: list[DiagGaussian] = []  # this round's λₖ
        for u in updates:
            assert u.site is not None  # checked by aggregate
            post = self._prior_for(u.client) + u.site.to(dtype=glob.dtype)  # λₖ = πₖ + λ̃ₖ
            # > 0 by construction (IVON's ess·(h + δ)) and checked on arrival in float32; guard float64 round-off
            self.count_guard("min-prec", sum(int((v < self.config.min_prec).sum()) for v in post.prec.values()))
            post = self.floor(post)
            old = self.client(u.client)
            dual = self.dual(u.client) + (post - glob).scale(gamma * rho)
            kept = self.set_client(u.client, Client(dual=dual, post=post, site=u.site.to(dtype=glob.dtype)))
            assert kept.post is not None and kept.dual is not None  # as stored (float32 state: rounded)
            fresh.append(kept.post)
            post_sum = post_sum + kept.post - (old.post if old.post is not None else lam0)
            dual_sum = dual_sum + (kept.dual - old.dual if old.dual is not None else kept.dual)
        if recompute_due(server_round):
            post_sum, dual_sum = self.recomputed_sums()
        a = self.alpha
        unseen = len(self.active) - self.seen_count()
        if self.config.server_mean == "participants" and 0 < len(fresh) < len(self.active):
            mean_post = reduce(operator.add, fresh).scale((1 - a) / len(fresh))
        elif unseen == 0:  # (full participation from round 1: the paper's setting, written as the paper's equation)
            mean_post = post_sum.scale((1 - a) / len(self.active))
        else:  # the mean over the clients heard from: post_sum holds λ₀ for each unseen one
            mean_post = (post_sum - lam0.scale(unseen)).scale((1 - a) / (len(self.active) - unseen))
        new = mean_post + (lam0 + dual_sum).scale(a)
        self.count_guard("min-prec", sum(int((v < self.config.min_prec).sum()) for v in new.prec.values()))
        self.state = self.state.replace(posterior=self.floor(new), post_sum=post_sum, dual_sum=dual_sum)

    def seen_count(self) -> int:
        """How many active clients the server has heard from (every stored bayes-admm client has a posterior)."""
        return len(self.heard_from())

    def recomputed_sums(self) -> tuple[DiagGaussian, DiagGaussian]:
        """(Σ_{k∈active} λₖ, Σ_{k∈active} λ̂ₖ) from the client store (λ₀ and 0 for a client never heard from)."""
        lam0 = self.prior0(self.config.prior_prec)
        post_sum, dual_sum = self.flat_prior(), self.flat_prior()
        unseen = len(self.active)
        for c in self.heard_from():
            st = self.client(c)
            if st.post is not None:
                post_sum, unseen = post_sum + st.post, unseen - 1
            if st.dual is not None:
                dual_sum = dual_sum + st.dual
        return post_sum + lam0.scale(unseen), dual_sum

    def contributions(self, estimator: str) -> dict[int, DiagGaussian]:
        """``dual`` (default): ĝₖ = λ̂ₖ; ``site``: ĝₖ = ρλ̃ₖ, the stored site of the client's last reply;
        ``corrected-dual``: ĝₖ = λ̂ₖ + (1 − γ)ρ(λₖ − λ̄).

        Client k's data term at temperature τ is gₖ = ρλ̃ₖ (its local problem has ess = Nₖ/(τρ), so IVON's site
        is ess·h = Nₖh/(τρ)); at the ADMM fixed point λ̄ = λ₀ + Σₖ gₖ, so λ̄ − gₖ is the fixed point without k.
        ``site`` reads gₖ from what the server stored, exact whatever prior was sent (the safe prior), γ, or
        participation pattern; the dual estimators rebuild it from the duals: at the fixed point the dual is the
        data term (λ̂ₖ = gₖ), off it the damped dual lags it by (1 − γ)ρ(λₖ − λ̄⁻), which ``corrected-dual`` adds
        back with the stored global in place of λ̄⁻ (:mod:`fedbayes.whatif`).  A client stored without a site
        (a checkpoint of an earlier version) gets ``corrected-dual`` under ``site``.  On a network the dual, an
        average over rounds (damping γ), is the better estimate of the data term than one noisy IVON site: see
        ``docs/whatif.md`` for the measurements behind the default."""
        if estimator not in self.removal_estimators:
            raise ValueError(f"unknown estimator '{estimator}' for {self.name}; valid: {list(self.removal_estimators)}")
        rho, gamma = self.rho, self.config.damping
        glob = self.global_posterior()
        out: dict[int, DiagGaussian] = {}
        for c in self.store.clients():
            st = self.client(c)
            dual, post = st.dual, st.post
            if dual is None:
                continue
            if estimator == "site" and st.site is not None:
                out[c] = st.site.scale(rho)
                continue
            if estimator != "dual" and post is not None and gamma < 1.0:
                dual = dual + (post - glob).scale((1.0 - gamma) * rho)
            out[c] = dual
        return out
