"""fedbayes: federated variational-Bayes ADMM with IVON clients — use it from Python.

The public API (imported lazily: ``import fedbayes`` stays light until a name is used)::

    import fedbayes
    result = fedbayes.run(fedbayes.BayesADMM(rho=0.2), model, clients, test=(x_test, y_test), rounds=10,
                          local=fedbayes.LocalSettings(lr=0.1, epochs=2), out="runs/x")
    result.metrics[-1]["test_accuracy"], result.posterior

* the rules, with their hyperparameters under the papers' names: :class:`BayesADMM`, :class:`FedAvg`,
  :class:`FedProx`, :class:`FedADMM`, :class:`FedDyn`, :class:`FedLap`, :class:`FedLapCov`, :class:`PVI`
  (:class:`Rule`, ``Rule.of(name, ...)``);
* :class:`LocalSettings` (local training), :func:`run` and its :class:`Result`;
* :class:`FederatedData` (what ``data = "package.module:function"`` returns; :mod:`fedbayes.data.user`);
* :class:`IVON`, the optimiser on its own (a torch-style optimiser: param groups, ``zero_grad``,
  ``step(closure)``; docs/python.md);
* :class:`Federation` (a rule, a model and data, ready to run) and :class:`DiagGaussian`.

The library never imports Flower outside its Flower adapters; ``server/`` and ``client/`` adapt it to Flower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BayesADMM": "fedbayes.api", "FedAvg": "fedbayes.api", "FedProx": "fedbayes.api", "FedADMM": "fedbayes.api",
    "FedDyn": "fedbayes.api", "FedLap": "fedbayes.api", "FedLapCov": "fedbayes.api", "PVI": "fedbayes.api",
    "Rule": "fedbayes.api", "Result": "fedbayes.api", "run": "fedbayes.api",
    "LocalSettings": "fedbayes.local", "IVON": "fedbayes.ivon", "DiagGaussian": "fedbayes.gaussian",
    "Federation": "fedbayes.federation", "FederatedData": "fedbayes.data.user",
}

__all__ = [
    "IVON", "PVI", "BayesADMM", "DiagGaussian", "FedADMM", "FedAvg", "FedDyn", "FedLap", "FedLapCov", "FedProx",
    "FederatedData", "Federation", "LocalSettings", "Result", "Rule", "run",
]

if TYPE_CHECKING:
    from fedbayes.api import PVI, BayesADMM, FedADMM, FedAvg, FedDyn, FedLap, FedLapCov, FedProx, Result, Rule, run
    from fedbayes.data.user import FederatedData
    from fedbayes.federation import Federation
    from fedbayes.gaussian import DiagGaussian
    from fedbayes.ivon import IVON
    from fedbayes.local import LocalSettings


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562): ``import fedbayes`` does not import torch."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedbayes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
