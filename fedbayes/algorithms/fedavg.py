"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017).

Prior: none (s_π = 0); clients start at the global mean m_g and train locally (Adam by default, as the
bayes-admm reference code does).  Server:

    m_g ← Σ_{k∈S} Nₖ mₖ / Σ_{k∈S} Nₖ
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedbayes.algorithms.base import Algorithm, ClientTask, ClientUpdate
from fedbayes.algorithms.space import Dim, LogUniform
from fedbayes.algorithms.state import NoState, State
from fedbayes.gaussian import Params

__all__ = ["FedAvg", "MeanState", "weighted_mean"]


@dataclass(frozen=True)
class MeanState(State):
    """A global mean m_g (FedAvg, FedProx)."""

    mean: Params


def weighted_mean(updates: list[ClientUpdate], names: list[str]) -> Params:
    total = float(sum(u.num_examples for u in updates))
    return {k: sum((u.num_examples / total) * Algorithm.mean_of(u)[k] for u in updates) for k in names}  # type: ignore[misc]


class FedAvg(Algorithm[MeanState, NoState]):
    name: ClassVar[str] = "fedavg"
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3}
    summary: ClassVar[str] = "weighted average of local models (McMahan et al. 2017)"
    search_space: ClassVar[dict[str, Dim]] = {"lr": LogUniform(1e-4, 1e-2)}

    def init_state(self, init_mean: Params) -> MeanState:
        return MeanState(mean=init_mean)

    def global_mean(self) -> Params:
        return self.state.mean

    def configure(self, client: int, server_round: int) -> ClientTask:
        return ClientTask(prior=self.flat_prior(), start_mean=self.global_mean())

    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        if updates:
            self.state = MeanState(mean=weighted_mean(updates, self.names))
