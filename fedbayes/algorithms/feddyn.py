"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021).

Client k keeps gₖ = ∇ℓ̄ₖ(mₖ_prev) (tracked here on the server, so clients stay stateless) and solves

    mₖ = argmin ℓ̄ₖ(θ) − ⟨gₖ, θ⟩ + (α/2)‖θ − m_g‖²  (+ (wd/2)‖θ‖², the reference code's extra weight decay)

i.e. a per-example prior with s_π = α + wd and η_π = α m_g + gₖ (a linear term plus a quadratic is a shifted
Gaussian).  Then, with S the clients that replied and K the total:

    gₖ ← gₖ − α(mₖ − m_g)                    for k ∈ S
    h  ← h − (α/K) Σ_{k∈S} (mₖ − m_g)
    m_g ← (1/|S|) Σ_{k∈S} mₖ − h/α

The reference code scales α by Nₖ/N per client; we keep the paper's uniform α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from fedbayes.algorithms.base import Algorithm, AlgorithmConfig, ClientTask, ClientUpdate
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.algorithms.state import State
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["FedDyn", "FedDynConfig"]


@dataclass(frozen=True)
class Global(State):
    mean: Params
    """m_g."""
    h: Params
    """The server's h."""


@dataclass(frozen=True)
class Client(State):
    grad: Params | None = None
    """gₖ (zero for a client never heard from)."""


class FedDynConfig(AlgorithmConfig):
    alpha: float = Field(0.01, gt=0.0, description="dynamic-regulariser weight α (per example)")
    weight_decay: float = Field(0.0, ge=0.0, description="extra zero-centred weight decay (per example)")


class FedDyn(Algorithm[Global, Client]):
    name: ClassVar[str] = "feddyn"
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3}
    summary: ClassVar[str] = "dynamic regularisation with server state h (Acar et al. 2021)"
    search_space: ClassVar[dict[str, Dim]] = {"lr": LogUniform(1e-4, 1e-2), "alpha": LogUniform(1e-4, 1.0)}
    Config = FedDynConfig
    config: FedDynConfig

    def init_state(self, init_mean: Params) -> Global:
        return Global(mean=init_mean, h=self.zeros())

    def global_mean(self) -> Params:
        return self.state.mean

    def _grad(self, client: int) -> Params:
        g = self.client(client).grad
        return g if g is not None else self.zeros()

    def configure(self, client: int, server_round: int) -> ClientTask:
        a, wd = self.config.alpha, self.config.weight_decay
        m_g = self.global_mean()
        g = self._grad(client)
        prior = DiagGaussian({k: a * m_g[k] + g[k] for k in self.names}, self.full(a + wd))
        return ClientTask(prior=prior, start_mean=m_g, overrides={"prior_per_example": True})

    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        if not updates:
            return
        a = self.config.alpha
        m_g = self.global_mean()
        h = dict(self.state.h)
        avg = self.zeros()
        for u in updates:
            m = self.mean_of(u)
            g = self._grad(u.client)
            self.set_client(u.client, Client(grad={k: g[k] - a * (m[k] - m_g[k]) for k in self.names}))
            for k in self.names:
                h[k] = h[k] - (a / len(self.active)) * (m[k] - m_g[k])
                avg[k] += m[k] / len(updates)
        self.state = Global(mean={k: avg[k] - h[k] / a for k in self.names}, h=h)
