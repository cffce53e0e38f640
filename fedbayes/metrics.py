"""Predictive metrics for the mean prediction and the posterior-averaged (Bayesian model average) one.

Classification (probabilities p ∈ Δ^{C−1}, labels y):
    accuracy = mean 1[argmax p = y]
    NLL      = −mean log p_y
    ECE      = Σ_b (n_b/n) |acc_b − conf_b| over 15 equal-width confidence bins (Guo et al. 2017)
    Brier    = mean Σ_c (p_c − 1[c = y])²
Regression (Gaussian likelihood with noise variance σ² and, for the BMA, the spread of the samples):
    RMSE, NLL = mean[½ log(2π v) + (y − μ)²/(2v)], v = σ² + Var_samples
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedbayes.gaussian import DiagGaussian
from fedbayes.predictive import predictive_outputs

__all__ = [
    "bma_outputs",
    "classification_metrics",
    "evaluate_model",
    "expected_calibration_error",
    "predict",
    "regression_metrics",
]


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = 0.0
    n = probs.shape[0]
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        mask = (conf > lo) & (conf <= hi) if i > 0 else (conf >= lo) & (conf <= hi)
        nb = int(mask.sum())
        if nb:
            ece += nb / n * abs(float(correct[mask].mean()) - float(conf[mask].double().mean()))
    return ece


def classification_metrics(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, float]:
    """accuracy, nll, ece, brier of predicted probabilities ``probs`` (n × C) for labels ``y``."""
    if probs.ndim != 2 or probs.shape[0] != y.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"classification_metrics: probs {tuple(probs.shape)} vs labels {tuple(y.shape)}")
    probs = probs.double()
    y = y.long()
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).double()
    p_y = probs.gather(1, y[:, None]).squeeze(1).clamp_min(1e-300)
    return {
        "accuracy": float((probs.argmax(1) == y).double().mean()),
        "nll": float(-p_y.log().mean()),
        "ece": expected_calibration_error(probs, y, bins),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
    }


def regression_metrics(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    """rmse and Gaussian nll of predictive mean/variance."""
    mean, var, y = mean.double().reshape(-1), var.double().reshape(-1), y.double().reshape(-1)
    if not (mean.shape == var.shape == y.shape) or y.numel() == 0:
        raise ValueError("regression_metrics: shapes differ or empty input")
    nll = 0.5 * torch.log(2 * math.pi * var) + (y - mean) ** 2 / (2 * var)
    return {"rmse": float(((y - mean) ** 2).mean().sqrt()), "nll": float(nll.mean())}


@torch.no_grad()
def predict(model: nn.Module, params: dict[str, Tensor] | None, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Model outputs (logits or regression means) for ``x`` with weights ``params`` (the model's own if None)."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        outs.append(model(xb) if params is None else functional_call(model, params, (xb,)))
    return torch.cat(outs)


@torch.no_grad()
def bma_outputs(
    model: nn.Module,
    posterior: DiagGaussian,
    x: Tensor,
    samples: int,
    task: str,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """Outputs of ``samples`` draws θ ~ posterior: probabilities (classification) or means (regression)."""
    outs = []
    for theta in posterior.sample(generator=generator, n=samples):
        params = {k: v.to(device=device, dtype=torch.float32) for k, v in theta.items()}
        out = predict(model, params, x)
        outs.append(out.softmax(-1) if task == "classification" else out.reshape(-1))
    return outs


def evaluate_model(
    model: nn.Module,
    mean: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    task: str,
    *,
    posterior: DiagGaussian | None = None,
    samples: int = 0,
    noise_var: float = 1.0,
    seed: int = 0,
    prefix: str = "test_",
    device: torch.device | str = "cpu",
    predictive: str = "sample",
    scale: float = 1.0,
    logit_samples: int = 1024,
) -> dict[str, float]:
    """Metrics of the mean prediction (``test_*``) and, if a posterior and samples > 0, of the BMA (``bma_test_*``).

    ``predictive`` is how the BMA is formed (:mod:`fedbayes.predictive`): ``"sample"`` averages ``samples``
    networks θ ~ posterior, ``"linearized"`` / ``"linearized-probit"`` use the linearised (GLM) predictive
    (``logit_samples`` Monte-Carlo draws of the Gaussian logits); ``scale`` multiplies the posterior variance (1:
    the posterior as it is)."""
    params = {k: v.to(device=device, dtype=torch.float32) for k, v in mean.items()}
    x, y = x.to(device), y.to(device)
    out = predict(model, params, x).cpu()
    y = y.cpu()
    if task == "classification":
        res = classification_metrics(out.softmax(-1), y)
    else:
        res = regression_metrics(out.reshape(-1), torch.full_like(out.reshape(-1), noise_var), y)
    metrics = {f"{prefix}{k}": v for k, v in res.items()}
    if posterior is not None and samples > 0:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"evaluate_model: the posterior-variance scale must be > 0, got {scale!r}")
        gen = torch.Generator().manual_seed(seed)
        if predictive == "sample":
            post = posterior if scale == 1.0 else posterior.scale(1.0 / scale)  # same mean, variance × scale
            outs = [o.cpu() for o in bma_outputs(model, post, x, samples, task, gen, device)]
            stacked = torch.stack(outs)
            if task == "classification":
                bres = classification_metrics(stacked.mean(0), y)
            else:
                bres = regression_metrics(stacked.mean(0), stacked.var(0, unbiased=False) + noise_var, y)
        else:
            out_p, f_var = predictive_outputs(model, posterior, x, task, predictive=predictive,
                                              samples=logit_samples, scale=scale, generator=gen, device=device)
            if task == "classification":
                bres = classification_metrics(out_p, y)
            else:
                assert f_var is not None
                bres = regression_metrics(out_p, f_var + noise_var, y)
        metrics.update({f"bma_{prefix}{k}": v for k, v in bres.items()})
    return metrics
