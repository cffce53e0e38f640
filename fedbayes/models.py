"""Models used in the papers' experiments, built by name.

* ``logreg``  — multinomial logistic regression (a single linear layer).
* ``mlp``     — the papers' MLP, D-200-100-C (784-200-100-10 on (F)MNIST) with a selectable activation;
  the bayes-admm reference hard-codes sigmoid, which is our default too.
* ``linreg``  — linear regression with a single output (Gaussian likelihood).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "model_names"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def _logreg(in_features: int, num_outputs: int, **_: object) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_outputs))


def _mlp(
    in_features: int,
    num_outputs: int,
    hidden: Sequence[int] = (200, 100),
    activation: str = "sigmoid",
    **_: object,
) -> nn.Module:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; valid: {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        if int(h) <= 0:
            raise ValueError(f"mlp hidden widths must be positive, got {list(hidden)}")
        layers += [nn.Linear(width, int(h)), _ACTIVATIONS[activation]()]
        width = int(h)
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _linreg(in_features: int, num_outputs: int = 1, **_: object) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 1))


MODELS: dict[str, Callable[..., nn.Module]] = {"logreg": _logreg, "mlp": _mlp, "linreg": _linreg}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, in_features: int, num_outputs: int, seed: int = 0, **kwargs: object) -> nn.Module:
    """Build model ``name`` with a seeded initialisation.

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones) or bad sizes.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {model_names()}")
    if in_features <= 0 or num_outputs <= 0:
        raise ValueError(f"model sizes must be positive (in_features={in_features}, num_outputs={num_outputs})")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MODELS[name](in_features, num_outputs, **kwargs)
    finally:
        torch.random.set_rng_state(gen_state)
    return model
