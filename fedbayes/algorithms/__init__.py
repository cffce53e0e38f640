"""Federated algorithms as server rules over natural parameters, with a registry by name.

Adding an algorithm = one module with an :class:`~fedbayes.algorithms.base.Algorithm` subclass, registered
here.  No per-algorithm branches anywhere else.
"""

from __future__ import annotations

from fedbayes.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientStore,
    ClientTask,
    ClientUpdate,
    cosine_lr,
)
from fedbayes.algorithms.bayes_admm import BayesADMM
from fedbayes.algorithms.fedadmm import FedADMM
from fedbayes.algorithms.fedavg import FedAvg
from fedbayes.algorithms.feddyn import FedDyn
from fedbayes.algorithms.fedlap import FedLap
from fedbayes.algorithms.fedlap_cov import FedLapCov
from fedbayes.algorithms.fedprox import FedProx
from fedbayes.algorithms.pvi import PVI
from fedbayes.algorithms.store import DiskStore, MemoryStore

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedADMM, FedDyn, FedLap, FedLapCov, PVI, BayesADMM)
}


def algorithm_names() -> list[str]:
    return list(REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm '{name}'; valid: {algorithm_names()}")
    return REGISTRY[name]


__all__ = [
    "REGISTRY",
    "Algorithm",
    "AlgorithmConfig",
    "ClientStore",
    "ClientTask",
    "ClientUpdate",
    "DiskStore",
    "MemoryStore",
    "algorithm_names",
    "cosine_lr",
    "get_algorithm",
]
