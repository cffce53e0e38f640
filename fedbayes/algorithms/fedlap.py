"""FedLap (Swaroop, Khan, Doshi-Velez, "Connecting Federated ADMM to Bayes", ICLR 2025).

Isotropic Laplace/delta-method PVI: sites tₖ(θ) ∝ exp(δ vₖᵀθ), prior N(0, δ⁻¹I), so the global is
q_g = N(m_g, δ⁻¹I) with m_g = Σₖ vₖ (no 1/K).  Client k minimises the summed loss under its cavity:

    mₖ = argmin Nₖ ℓ̄ₖ(θ) + δ vₖᵀθ + (δ/2)‖θ − m_g‖²  ⇔  prior N(m_g − vₖ, 1/δ) (absolute units)

and the server damps the sites (ρ = dual step):

    vₖ ← vₖ + ρ(mₖ − m_g)   for k ∈ S,        m_g ← Σ_{k=1..K} vₖ

m_g is itself the sum, kept running: m_g ← m_g + Σ_{k∈S} (vₖ_new − vₖ_old), so a round costs O(participants ×
parameters), not O(K × parameters); it is recomputed from the client store every ``RECOMPUTE_EVERY`` rounds.

**ρ and the participants.**  m_g = Σₖ vₖ moves by ρ·Σ_{k∈S}(mₖ − m_g) = |S|ρ times the participants' average
displacement: |S|ρ is the server step (|S|ρ = 1 makes round 1 exactly FedAvg's average; |S|ρ ≪ 1 shrinks the
global towards 0, |S|ρ > 2 overshoots).  So ρ is given as ``rho-k`` = |S|ρ (default 1: the reference's ρ = 0.1
at K = 10, every client every round), with |S| the expected participants per round (``clients-per-round`` of
the K clients), which transfers across federation sizes and participation rates; an explicit ``rho`` (the
paper's scale) overrides it.  (A search over ρ on a log scale without this wasted most trials at |S|ρ ≪ 1,
where the model stays at chance; and ρ = ``rho-k``/K with 10 of 100 clients a round, an earlier form, left
FedLap at 0.39 test accuracy after 50 rounds of MNIST with 2 classes per client, against FedAvg's 0.91.)

Fixed point: the MAP estimate under N(0, δ⁻¹I).  Round 1 starts from the model's initial weights (m_g = 0
would leave a sigmoid MLP symmetric); its prior is N(0, δ⁻¹I), as in the reference (vₖ = 0, w_g = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from fedbayes.algorithms.base import Algorithm, ClientTask, ClientUpdate, KScaledRho, recompute_due
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.algorithms.state import State
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["FedLap", "FedLapConfig"]


@dataclass(frozen=True)
class Global(State):
    mean: Params
    """m_g = Σₖ vₖ."""
    start: Params | None = None
    """Round 1's start point (the model's initial weights)."""


@dataclass(frozen=True)
class Client(State):
    dual: Params | None = None
    """vₖ, the site's (scaled) natural mean."""


class FedLapConfig(KScaledRho):
    participates: ClassVar[bool] = True
    prior_prec: float = Field(1.0, gt=0.0, description="δ: prior precision and penalty (summed-loss units)")
    rho: float | None = Field(None, gt=0.0, le=1.0, description="dual step / site damping ρ (default rho-k / |S|)")
    rho_k: float | None = Field(None, gt=0.0, le=2.0, description="|S|ρ, the server step, |S| the participants per "
                                "round (default 1; free of K and the participation rate)")


class FedLap(Algorithm[Global, Client]):
    name: ClassVar[str] = "fedlap"
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3}
    summary: ClassVar[str] = "isotropic Laplace PVI = ADMM with prior δ (Swaroop et al. 2025)"
    search_space: ClassVar[dict[str, Dim]] = {
        "lr": LogUniform(1e-4, 1e-2), "prior-prec": LogUniform(1e-2, 1e2), "rho-k": LogUniform(0.1, 2.0),
    }
    Config = FedLapConfig
    config: FedLapConfig

    @property
    def rho(self) -> float:
        """ρ = ``rho`` if given, else ``rho-k``/|S| (|S| the expected participants per round)."""
        return self.config.effective_rho(len(self.active), self.participants)

    def init_state(self, init_mean: Params) -> Global:
        return Global(mean=self.zeros(), start=init_mean)

    def global_mean(self) -> Params:
        return self.state.mean

    def _dual(self, client: int) -> Params:
        v = self.client(client).dual
        return v if v is not None else self.zeros()

    def configure(self, client: int, server_round: int) -> ClientTask:
        d = self.config.prior_prec
        m_g = self.global_mean()
        v = self._dual(client)
        prior = DiagGaussian({k: d * (m_g[k] - v[k]) for k in self.names}, self.full(d))
        start = (self.state.start or m_g) if server_round <= 1 else m_g
        return ClientTask(prior=prior, start_mean=start)

    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        rho = self.rho
        m_g = self.global_mean()
        total = dict(m_g)
        for u in updates:
            v = self._dual(u.client)
            m = self.mean_of(u)
            kept = self.set_client(u.client, Client(dual={k: v[k] + rho * (m[k] - m_g[k]) for k in self.names}))
            assert kept.dual is not None  # as stored (float32 state: rounded)
            total = {k: total[k] + kept.dual[k] - v[k] for k in self.names}
        if recompute_due(server_round):
            total = self.recomputed_total()
        self.state = self.state.replace(mean=total)

    def recomputed_total(self) -> Params:
        """Σ_{k active} vₖ from the client store (an excluded client's stored dual, a run forgetting it, is not in
        the sum); O(clients heard from), not O(K)."""
        total = self.zeros()
        for c in self.heard_from():
            dual = self.client(c).dual
            if dual is not None:
                total = {k: total[k] + dual[k] for k in self.names}
        return total
