"""FedADMM: global-consensus ADMM in scaled form (Boyd et al. 2011 §7.1; federated by Gong et al. 2022, and
the "classic federated ADMM" special case of Möllenhoff et al. 2025, App. B.1).

Per-example penalty ρ and duals yₖ (mean-loss units).  Client k (x-update):

    mₖ = argmin ℓ̄ₖ(θ) + ⟨yₖ, θ − m_g⟩ + (ρ/2)‖θ − m_g‖²  ⇔  prior N(m_g − yₖ/ρ, 1/ρ) per example

Server, in Boyd's order (z-update with the new primal and old duals, then the dual step), over all K clients
(absent ones keep their last mₖ, yₖ):

    m_g ← (1/K) Σₖ (mₖ + yₖ/ρ)
    yₖ  ← yₖ + ρ(mₖ − m_g)          for k ∈ S

The sum over all K clients is kept as a running sum T = Σₖ (mₖ + yₖ/ρ) (``Global.total``), updated by the
participants' changes, so a round costs O(participants × parameters), not O(K × parameters); it is recomputed
from the client store every ``RECOMPUTE_EVERY`` rounds (bounding float64 drift) and when it is missing.

The reference code uses Gong et al.'s server step w_g ← w_g + (η/K)Σ(2wₖ − w_g − wₖ_old) and unsquared norms;
we implement the standard consensus ADMM instead (its fixed point is the minimiser of Σₖ ℓ̄ₖ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from fedbayes.algorithms.base import Algorithm, AlgorithmConfig, ClientTask, ClientUpdate, recompute_due
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.algorithms.state import DERIVED, State
from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["FedADMM", "FedADMMConfig"]


@dataclass(frozen=True)
class Global(State):
    mean: Params
    """m_g."""
    init: Params | None = None
    """The round-0 mean: mₖ of a client never heard from (set at the first update)."""
    total: Params | None = field(default=None, metadata=DERIVED)
    """T = Σ_{k active} (mₖ + yₖ/ρ), the running sum behind m_g = T/K (clients never heard from count as init)."""


@dataclass(frozen=True)
class Client(State):
    local: Params | None = None
    """mₖ, the client's last local solution."""
    dual: Params | None = None
    """yₖ."""


class FedADMMConfig(AlgorithmConfig):
    rho: float = Field(0.01, gt=0.0, description="ADMM penalty ρ (per example)")


class FedADMM(Algorithm[Global, Client]):
    name: ClassVar[str] = "fedadmm"
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3}
    summary: ClassVar[str] = "consensus ADMM with per-client duals (Boyd et al. 2011; Gong et al. 2022)"
    search_space: ClassVar[dict[str, Dim]] = {"lr": LogUniform(1e-4, 1e-2), "rho": LogUniform(1e-4, 1.0)}
    Config = FedADMMConfig
    config: FedADMMConfig

    def init_state(self, init_mean: Params) -> Global:
        return Global(mean=init_mean)

    def global_mean(self) -> Params:
        return self.state.mean

    def _client(self, k: int) -> tuple[Params, Params]:
        """(mₖ, yₖ); a client never heard from counts as the round-0 mean with a zero dual."""
        st = self.client(k)
        m = st.local if st.local is not None else (self.state.init or self.state.mean)
        return m, st.dual if st.dual is not None else self.zeros()

    def configure(self, client: int, server_round: int) -> ClientTask:
        rho = self.config.rho
        m_g = self.global_mean()
        _, y = self._client(client)
        prior = DiagGaussian({k: rho * m_g[k] - y[k] for k in self.names}, self.full(rho))
        return ClientTask(prior=prior, start_mean=m_g, overrides={"prior_per_example": True})

    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        if not updates:
            return
        rho, K = self.config.rho, len(self.active)
        init = self.state.init or self.state.mean  # remember the round-0 mean for never-seen clients
        self.state = self.state.replace(init=init)
        total = self.state.total if self.state.total is not None else self.recomputed_total()
        old = {u.client: self._client(u.client) for u in updates}
        fresh = {u.client: self.mean_of(u) for u in updates}
        # z-update with the new primals and the old duals: T − Σ_S mₖ_old + Σ_S mₖ
        z_sum = dict(total)
        for c, m in fresh.items():
            z_sum = {k: z_sum[k] + (m[k] - old[c][0][k]) for k in self.names}
        m_g = {k: v / K for k, v in z_sum.items()}
        for c, m in fresh.items():
            m_old, y_old = old[c]
            y = {k: y_old[k] + rho * (m[k] - m_g[k]) for k in self.names}
            kept = self.set_client(c, Client(local=m, dual=y))  # as stored (float32 state: rounded)
            assert kept.local is not None and kept.dual is not None
            total = {k: total[k] + (kept.local[k] + kept.dual[k] / rho) - (m_old[k] + y_old[k] / rho)
                     for k in self.names}
        if recompute_due(server_round):
            total = self.recomputed_total()
        self.state = self.state.replace(mean=m_g, total=total)

    def recomputed_total(self) -> Params:
        """T = Σ_{k active} (mₖ + yₖ/ρ) from the client store; O(clients heard from), not O(K)."""
        rho = self.config.rho
        init = self.state.init or self.state.mean
        total = self.zeros()
        unseen = len(self.active)
        for c in self.heard_from():
            m, y = self._client(c)
            total = {k: total[k] + m[k] + y[k] / rho for k in self.names}
            unseen -= 1
        return {k: total[k] + unseen * init[k] for k in self.names}
