"""FedADMM: global-consensus ADMM in scaled form (Boyd et al. 2011 §7.1; federated by Gong et al. 2022, and
the "classic federated ADMM" special case of Möllenhoff et al. 2025, App. B.1).

Per-example penalty ρ and duals yₖ (mean-loss units).  Client k (x-update):

    mₖ = argmin ℓ̄ₖ(θ) + ⟨yₖ, θ − m_g⟩ + (ρ/2)‖θ − m_g‖²  ⇔  prior N(m_g − yₖ/ρ, 1/ρ) per example

Server, in Boyd's order (z-update with the new primal and old duals, then the dual step), over all K clients
(absent ones keep their last mₖ, yₖ):

    m_g ← (1/K) Σₖ (mₖ + yₖ/ρ)
    yₖ  ← yₖ + ρ(mₖ − m_g)          for k ∈ S

The reference code uses Gong et al.'s server step w_g ← w_g + (η/K)Σ(2wₖ − w_g − wₖ_old) and unsquared norms;
we implement the standard consensus ADMM instead (its fixed point is the minimiser of Σₖ ℓ̄ₖ).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from fedbayes.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientTask,
    ClientUpdate,
    params_from,
    params_to,
)
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["FedADMM", "FedADMMConfig"]


class FedADMMConfig(AlgorithmConfig):
    rho: float = Field(0.01, gt=0.0, description="ADMM penalty ρ (per example)")


class FedADMM(Algorithm):
    name: ClassVar[str] = "fedadmm"
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3}
    summary: ClassVar[str] = "consensus ADMM with per-client duals (Boyd et al. 2011; Gong et al. 2022)"
    search_space: ClassVar[dict[str, Dim]] = {"lr": LogUniform(1e-4, 1e-2), "rho": LogUniform(1e-4, 1.0)}
    Config = FedADMMConfig
    config: FedADMMConfig

    def init_state(self, init_mean: Params) -> None:
        self.server = params_to("mean", init_mean)
        self._init = init_mean

    def global_mean(self) -> Params:
        out = params_from("mean", self.server, self.names)
        assert out is not None
        return out

    def _client(self, k: int) -> tuple[Params, Params]:
        d = self.store.get_all(k)
        m = params_from("local", d, self.names) or self.global_mean_at_start()
        y = params_from("dual", d, self.names) or self.zeros()
        return m, y

    def global_mean_at_start(self) -> Params:
        init = params_from("init", self.server, self.names)
        return init if init is not None else self.global_mean()

    def configure(self, client: int, server_round: int) -> ClientTask:
        rho = self.config.rho
        m_g = self.global_mean()
        _, y = self._client(client)
        prior = DiagGaussian({k: rho * m_g[k] - y[k] for k in self.names}, self.full(rho))
        return ClientTask(prior=prior, start_mean=m_g, overrides={"prior_per_example": True})

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> None:
        self.check_updates(updates)  # FIX: validate all replies before touching state (base.check_updates)
        if not updates:
            return
        rho = self.config.rho
        if "init/" + self.names[0] not in self.server:  # remember the round-0 mean for never-seen clients
            self.server.update(params_to("init", self.global_mean()))
        fresh = {u.client: self.mean_of(u) for u in updates}
        acc = self.zeros()
        duals: dict[int, Params] = {}
        for c in self.active:
            m, y = self._client(c)
            if c in fresh:
                m = fresh[c]
            duals[c] = y
            for k in self.names:
                acc[k] += (m[k] + y[k] / rho) / len(self.active)
        self.server.update(params_to("mean", acc))
        for c, m in fresh.items():
            y = {k: duals[c][k] + rho * (m[k] - acc[k]) for k in self.names}
            self.store.put_all(c, {**params_to("local", m), **params_to("dual", y)})
