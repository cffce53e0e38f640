"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Local objective (mean loss): ℓ̄ₖ(θ) + (μ/2)‖θ − m_g‖² — the squared norm of the paper (the bayes-admm
reference code uses the unsquared norm; we do not copy that).  As a prior: πₖ = N(m_g, 1/μ) *per example*,
i.e. s_π = ess·μ = Nₖμ/τ in the summed-loss units of the local trainer.  Server: as FedAvg.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from fedbayes.algorithms.base import AlgorithmConfig, ClientTask
from fedbayes.algorithms.fedavg import FedAvg
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.gaussian import DiagGaussian

__all__ = ["FedProx", "FedProxConfig"]


class FedProxConfig(AlgorithmConfig):
    mu: float = Field(0.01, ge=0.0, description="proximal weight μ (per example)")


class FedProx(FedAvg):
    name: ClassVar[str] = "fedprox"
    summary: ClassVar[str] = "FedAvg + proximal term (μ/2)‖θ − m_g‖² (Li et al. 2020)"
    search_space: ClassVar[dict[str, Dim]] = {"lr": LogUniform(1e-4, 1e-2), "mu": LogUniform(1e-4, 1.0)}
    Config = FedProxConfig
    config: FedProxConfig

    def configure(self, client: int, server_round: int) -> ClientTask:
        m = self.global_mean()
        mu = self.config.mu
        prior = DiagGaussian({k: mu * v for k, v in m.items()}, self.full(mu))
        return ClientTask(prior=prior, start_mean=m, overrides={"prior_per_example": True})
