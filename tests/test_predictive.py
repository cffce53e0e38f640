"""The linearised (GLM) predictive against brute force and closed forms; re-evaluating a saved run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from fedbayes.config import resolve
from fedbayes.gaussian import DiagGaussian
from fedbayes.metrics import classification_metrics, evaluate_model
from fedbayes.predictive import _moments_jacobian, gaussian_softmax, linearized_moments, predictive_outputs


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4, bias=False), nn.Sigmoid(),
                         nn.Linear(4, 3)).double()


def _posterior(model: nn.Module, seed: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mean = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in model.named_parameters()}
    var = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) * 0.5 for k, v in model.named_parameters()}
    return mean, var


def _brute_force(model: nn.Module, mean: dict[str, torch.Tensor], var: dict[str, torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
    """J Σ Jᵀ per example from its own Jacobian (jacrev, one example at a time)."""
    covs = []
    for xi in x:
        jac = jacrev(lambda p, xi=xi: functional_call(model, p, (xi[None],))[0])(mean)
        j = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in mean], 1)  # (C, P)
        s = torch.cat([var[k].reshape(-1) for k in mean])
        covs.append(j @ torch.diag(s) @ j.T)
    return torch.stack(covs)


def test_linearized_covariance_equals_brute_force_jacobians() -> None:
    model = _mlp()
    mean, var = _posterior(model)
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mu, cov = linearized_moments(model, mean, var, x, chunk=4)  # Linear-only: the per-layer path, in chunks
    want = _brute_force(model, mean, var, x)
    torch.testing.assert_close(mu, functional_call(model, mean, (x,)))
    torch.testing.assert_close(cov, want)  # the full C×C covariance, hence its diagonal Σ_p J_cp² σ_p²
    torch.testing.assert_close(torch.diagonal(cov, dim1=1, dim2=2),
                               torch.stack([torch.diagonal(c) for c in want]))
    _, cov_generic = _moments_jacobian(model, mean, var, x)  # the vmap(jacrev) fallback agrees
    torch.testing.assert_close(cov_generic, want)


def test_generic_path_for_models_with_other_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    mean, var = _posterior(model, seed=3)
    x = torch.randn(5, 4, dtype=torch.float64)
    _, cov = linearized_moments(model, mean, var, x)
    torch.testing.assert_close(cov, _brute_force(model, mean, var, x))


def test_linear_gaussian_model_gives_the_exact_predictive_variance() -> None:
    """For f = wᵀx + b the linearisation is exact: Var f = Σ_j x_j² σ²_wj + σ²_b, and the predictive adds σ²."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 1))
    g = torch.Generator().manual_seed(4)
    mean = {"1.weight": torch.randn(1, 3, generator=g, dtype=torch.float64),
            "1.bias": torch.randn(1, generator=g, dtype=torch.float64)}
    prec = {"1.weight": torch.tensor([[2.0, 0.5, 4.0]], dtype=torch.float64),
            "1.bias": torch.tensor([3.0], dtype=torch.float64)}
    post = DiagGaussian.from_mean_prec(mean, prec)
    x = torch.randn(6, 3, generator=g)
    exact_var = (x.double() ** 2 / prec["1.weight"]).sum(1) + 1 / prec["1.bias"]
    exact_mean = x.double() @ mean["1.weight"][0] + mean["1.bias"]
    mu, f_var = predictive_outputs(model, post, x, "regression")
    assert f_var is not None
    torch.testing.assert_close(f_var, exact_var)
    torch.testing.assert_close(mu, exact_mean, rtol=1e-6, atol=1e-6)
    y = exact_mean + 0.3
    noise = 0.25
    m = evaluate_model(model, mean, x, y, "regression", posterior=post, samples=4, noise_var=noise,
                       predictive="linearized")
    v = exact_var + noise
    nll = float((0.5 * torch.log(2 * math.pi * v) + 0.09 / (2 * v)).mean())
    assert m["bma_test_nll"] == pytest.approx(nll, rel=1e-5)
    # bma-scale multiplies the posterior variance
    _, f_var2 = predictive_outputs(model, post, x, "regression", scale=3.0)
    assert f_var2 is not None
    torch.testing.assert_close(f_var2, 3 * exact_var)


@pytest.mark.parametrize("predictive", ["sample", "linearized", "linearized-probit"])
def test_predictive_reduces_to_the_mean_as_the_variance_vanishes(predictive: str) -> None:
    model = _mlp().float()
    mean, _ = _posterior(model)
    post = DiagGaussian.from_mean_prec(mean, {k: torch.full_like(v, 1e14) for k, v in mean.items()})
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(6))
    m = evaluate_model(model, mean, x, y, "classification", posterior=post, samples=8, predictive=predictive)
    for k in ("accuracy", "nll", "ece", "brier"):
        assert m[f"bma_test_{k}"] == pytest.approx(m[f"test_{k}"], abs=1e-5)
    # and a tiny bma-scale does the same for a wide posterior
    wide = DiagGaussian.from_mean_prec(mean, {k: torch.ones_like(v) for k, v in mean.items()})
    m2 = evaluate_model(model, mean, x, y, "classification", posterior=wide, samples=8, predictive=predictive,
                        scale=1e-14)
    assert m2["bma_test_nll"] == pytest.approx(m["test_nll"], abs=1e-5)


def test_gaussian_softmax_monte_carlo_and_probit() -> None:
    mu = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_softmax(mu, zero, 4), mu.softmax(-1))
    torch.testing.assert_close(gaussian_softmax(mu, zero, 4, probit=True), mu.softmax(-1))
    # perfectly correlated logits with equal variance: softmax is shift-invariant, so nothing changes
    ones = torch.ones(1, 3, 3, dtype=torch.float64) * 5.0
    torch.testing.assert_close(gaussian_softmax(mu, ones, 16, torch.Generator().manual_seed(0)), mu.softmax(-1))
    # independent logits with variance: the average is less confident, and MC is close to probit (an approximation
    # for softmax: within 0.06 at variance 4)
    cov = torch.diag(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))[None]
    mc = gaussian_softmax(mu, cov, 20000, torch.Generator().manual_seed(0))
    assert float(mc.max()) < float(mu.softmax(-1).max())
    assert float((mc - gaussian_softmax(mu, cov, 0, probit=True)).abs().max()) < 0.05


def test_bma_predictive_keys() -> None:
    assert resolve({"algorithm": "fedlap-cov"}).run.bma_predictive == "linearized-probit"
    assert resolve({"algorithm": "pvi", "bma-predictive": "sample"}).run.bma_predictive == "sample"
    with pytest.raises(ValueError, match="bma-scale"):
        resolve({"bma-scale": 0})
    with pytest.raises(ValueError, match="bma-predictive"):
        resolve({"bma-predictive": "auto"})


def test_evaluate_reproduces_the_recorded_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedbayes.cli import main
    from simulations.evaluate import SavedRun

    run = tmp_path / "run"
    assert main(["run", "--algorithm", "fedlap-cov", "--dataset", "digits", "--clients", "3", "--rounds", "2",
                 "--set", "hidden=8", "--set", "epochs=1", "--set", "bma-samples=4", "--set",
                 "validation-fraction=0.1", "--set", "eval-split=validation", "--quiet", "--out", str(run)]) == 0
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    saved = SavedRun.load(run)
    same = saved.evaluate()
    for k in ("val_nll", "bma_val_nll", "bma_val_accuracy", "bma_val_ece"):
        assert same[k] == pytest.approx(last[k], rel=1e-9, abs=1e-12)
    sampled = saved.evaluate({"bma-predictive": "sample", "bma-scale": 0.5}, "test")
    assert "bma_test_nll" in sampled and sampled["test_nll"] != same["val_nll"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "validation", "--set", "bma-predictive=linearized-probit"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"val_accuracy", "bma_val_accuracy", "bma_val_nll"}
    assert main(["evaluate", str(run), "--set", "lr=0.1"]) == 2  # training keys cannot change after training
    assert "cannot be changed after training" in capsys.readouterr().err


def test_classification_metrics_of_linearized_probs_are_valid() -> None:
    model = _mlp().float()
    mean, var = _posterior(model)
    post = DiagGaussian.from_mean_prec(mean, {k: 1 / v for k, v in var.items()})
    x = torch.randn(20, 5)
    p, none = predictive_outputs(model, post, x, "classification", samples=32,
                                 generator=torch.Generator().manual_seed(0))
    assert none is None and p.shape == (20, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(20, dtype=p.dtype))
    classification_metrics(p, torch.zeros(20, dtype=torch.long))


def test_evaluate_gives_a_run_without_one_a_validation_set_from_unused_examples(tmp_path: Path) -> None:
    """``fedbayes evaluate --validation-fraction``: a run trained without a validation set is evaluated on one drawn
    from the examples no client holds (the same rows a run trained with that fraction would have); refused when
    only a hold-out out of the clients' data is possible."""
    from fedbayes.config import ConfigError, resolve
    from fedbayes.engine import run_experiment
    from fedbayes.federation import Federation
    from simulations.evaluate import evaluate_run

    flat = {"dataset": "digits", "algorithm": "pvi", "num-clients": 3, "rounds": 1, "hidden": "8", "epochs": 1,
            "train-fraction": 0.5, "bma-samples": 2}
    run_experiment(flat, tmp_path / "a", progress=False)
    res = evaluate_run(tmp_path / "a", split="validation", validation_fraction=0.3)
    fed = Federation.build(resolve({**flat, "validation-fraction": 0.3}))
    assert fed.validation is not None and "val_accuracy" in res and "bma_val_nll" in res
    full = {**flat, "train-fraction": 1.0}
    run_experiment(full, tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="a hold-out would take examples the run trained on"):
        evaluate_run(tmp_path / "b", split="validation", validation_fraction=0.3)


def test_conv_layers_take_the_exact_per_layer_path() -> None:
    """A network of Conv2d (padding, stride, with and without bias) and Linear layers: the per-layer path's J Σ Jᵀ
    equals per-example Jacobians, and no vmap(jacrev) runs."""
    from unittest import mock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, bias=False),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).double()
    mean, var = _posterior(model, seed=5)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with mock.patch("fedbayes.predictive._moments_jacobian", side_effect=AssertionError("generic path used")):
        mu, cov = linearized_moments(model, mean, var, x, chunk=8)  # chunks of 2 with convolutions
    torch.testing.assert_close(mu, functional_call(model, mean, (x,)))
    torch.testing.assert_close(cov, _brute_force(model, mean, var, x))
