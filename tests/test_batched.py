"""Batched clients (:mod:`fedbayes.batched`): the same answers as the sequential trainer, rule by rule and client by
client; diverged clients fail alone; models and settings the batched path cannot take are refused with the reason,
before any training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fedbayes.batched as batched
import fedbayes.stacked as stacking
from fedbayes.algorithms import algorithm_names
from fedbayes.batched import Unbatchable, check_batchable, train_batched
from fedbayes.config import ConfigError, resolve
from fedbayes.engine import run_experiment
from fedbayes.federation import batched_clients
from fedbayes.gaussian import DiagGaussian
from fedbayes.local import LocalSettings, StatefulModelError, train_local
from fedbayes.models import build_model

BASE: dict[str, Any] = {
    "dataset": "digits", "num-clients": 4, "partition": "dirichlet", "size-alpha": 5.0, "class-alpha": 5.0,
    "rounds": 3, "model": "mlp", "hidden": "32", "activation": "sigmoid", "epochs": 2, "device": "cpu", "seed": 0,
    "bma-samples": 0,
}
# Point rules at Adam lr 0.01 (0.05 makes 3 rounds of Adam sensitive enough that float rounding alone moves the
# posterior by 1e-5).  FedProx and FedDyn run SGD: digits has pixels that are zero in (almost) every example, and at
# their first-layer weights the only gradient is the proximal one, s_π(θ − c) with θ − c of one float32 ulp (the
# center travels as η/s); Adam divides it by its own size and steps lr·sign(θ − c), so any 1-ulp difference,
# batched or not, moves those weights by lr (measured: 5e-3 relative after 3 rounds, on those weights only).
PER_ALGO: dict[str, dict[str, Any]] = {
    **{a: {"lr": 0.01} for a in ("fedavg", "fedadmm", "fedlap", "fedlap-cov")},
    "fedprox": {"mode": "sgd", "lr": 0.05},
    "feddyn": {"mode": "sgd", "lr": 0.05},
    "fedlap-cov": {"rho": 0.5, "lr": 0.01},
    "pvi": {"epochs": 3},
    "bayes-admm": {"epochs": 3},
}
RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖∞ / ‖a‖∞ (0 for two zero tensors)."""
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


@pytest.mark.parametrize("name", algorithm_names())
def test_batched_engine_gives_the_sequential_posterior(name: str, tmp_path: Path) -> None:
    """3 rounds on digits, 4 clients of different sizes (so clients finish at different steps): the global
    posterior (or mean) of ``client-engine = batched`` equals the sequential engine's to 1e-5 relative, per tensor."""
    out = {}
    for eng in ("sequential", "batched"):
        cfg = {**BASE, "algorithm": name, **PER_ALGO.get(name, {}), "client-engine": eng}
        rows = run_experiment(cfg, tmp_path / eng, progress=False)
        out[eng] = load_file(tmp_path / eng / "posterior.safetensors")
        assert [r["participants"] for r in rows] == [[0, 1, 2, 3]] * 3
    seq, bat = out["sequential"], out["batched"]
    assert seq.keys() == bat.keys()
    errs = {k: rel(seq[k], bat[k]) for k in seq}
    assert max(errs.values()) <= RTOL, errs


def _digits_clients(mode: str, **kw: Any) -> tuple[nn.Module, list[tuple[Any, ...]]]:
    """Four clients of 30 to 450 digits with their own prior, warm start, seed, lr, epochs and max-steps."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x = torch.tensor(x_all / 16.0, dtype=torch.float32)
    y = torch.tensor(y_all)
    model = build_model("mlp", 64, 10, seed=0, hidden=(32, 16))
    named = {k: v.detach().clone() for k, v in model.named_parameters()}
    specs = []
    off = 0
    for i, (n, epochs, max_steps) in enumerate([(30, 2, 0), (200, 1, 0), (77, 3, 0), (450, 2, 17)]):
        g = torch.Generator().manual_seed(i)
        prec = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) * 2 for k, v in named.items()}
        mean = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1 for k, v in named.items()}
        start = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in named.items()}
        start_prec = {k: p + 50.0 for k, p in prec.items()} if mode == "ivon" else None
        settings = LocalSettings(mode=mode, epochs=epochs, max_steps=max_steps, batch_size=32, seed=100 + i,
                                 lr=(0.05 if mode == "ivon" else 0.01) * (1 + 0.2 * i), hess_init=0.1 * (i + 1),
                                 temperature=1.0 / (i + 1), **kw)
        specs.append((DiagGaussian.from_mean_prec(mean, prec), x[off : off + n], y[off : off + n], settings, start,
                      start_prec))
        off += n
    return model, specs


@pytest.mark.parametrize(("mode", "kw"), [
    ("ivon", {"signed_site": True}),
    ("ivon", {"mc_samples": 2, "antithetic": True}),   # unsigned sites: the clamp counts must agree too
    ("ivon", {"mc_samples": 3}),
    ("adam", {"laplace": True, "grad_clip": 0.5}),
    ("adam", {"prior_per_example": True}),
    ("sgd", {"momentum": 0.9}),
])
def test_each_client_gets_what_train_local_gives(mode: str, kw: dict[str, Any]) -> None:
    """Client by client (sizes, epochs, max-steps, lr, hess-init, temperature and seeds all differ): the mean, the
    site, the step count, the mean training loss and IVON's clamp count of the batched path equal train_local's."""
    model, specs = _digits_clients(mode, **kw)
    seq = [train_local(model, p, x, y, s, start_mean=sm, start_prec=sp) for p, x, y, s, sm, sp in specs]
    bat = train_batched(model, specs)
    for a, b in zip(seq, bat, strict=True):
        assert not isinstance(b, Exception)
        assert a.metrics["steps"] == b.metrics["steps"] and a.num_examples == b.num_examples
        assert max(rel(a.mean[k], b.mean[k]) for k in a.mean) <= 2e-6
        assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-6)
        assert (a.site is None) == (b.site is None)
        if a.site is not None and b.site is not None:
            assert max(rel(a.site.prec[k], b.site.prec[k]) for k in a.mean) <= 2e-6
            assert max(rel(a.site.eta[k], b.site.eta[k]) for k in a.mean) <= 2e-6
            assert a.metrics.get("site_clamped") == b.metrics.get("site_clamped")
    assert [s.metrics["steps"] for s in seq] == [2.0, 7.0, 9.0, 17.0]  # epochs·⌈n/32⌉, max-steps 17


def test_chunks_give_the_same_answers_as_one_batch() -> None:
    model, specs = _digits_clients("ivon", signed_site=True)
    whole = train_batched(model, specs)
    ones = train_batched(model, specs, batch_clients=1)
    for a, b in zip(whole, ones, strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception)
        assert max(rel(a.mean[k], b.mean[k]) for k in a.mean) <= 2e-6


def test_a_diverging_client_fails_alone() -> None:
    model, specs = _digits_clients("ivon", signed_site=True)
    p, x, y, s, sm, sp = specs[1]
    specs[1] = (p, x, y, s.model_copy(update={"lr": 1e30}), sm, sp)
    res = train_batched(model, specs)
    assert isinstance(res[1], FloatingPointError) and "not finite" in str(res[1])
    for i in (0, 2, 3):
        p, x, y, s, sm, sp = specs[i]
        ref = train_local(model, p, x, y, s, start_mean=sm, start_prec=sp)
        got = res[i]
        assert not isinstance(got, Exception)
        assert max(rel(ref.mean[k], got.mean[k]) for k in ref.mean) <= 2e-6


class _WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


class _InPlaceCounter(nn.Module):
    """A custom module that keeps state in a plain attribute and mutates it in forward: vmap refuses the
    in-place write into a captured tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen = torch.zeros(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        self.seen.add_(out.detach().sum(0))
        return out


@pytest.mark.parametrize(("model", "why"), [
    (nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), "Dropout"),
    (_InPlaceCounter(), "vmap cannot vectorise"),
])
def test_models_the_batched_path_cannot_take_are_refused_with_the_reason(model: nn.Module, why: str) -> None:
    with pytest.raises(Unbatchable, match=why):
        check_batchable(model)


def test_running_statistics_are_refused_on_every_path_naming_the_module() -> None:
    """Not an Unbatchable (which ``client-engine = auto`` would answer with the sequential path): BatchNorm's running
    statistics are refused everywhere, with the module's name and class and the GroupNorm suggestion."""
    with pytest.raises(StatefulModelError, match=r"module 'bn' \(BatchNorm1d\) keeps running statistics.*GroupNorm"):
        check_batchable(_WithBatchNorm())


def test_client_engine_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``batched`` with a mode it cannot batch is a config error before training; ``auto`` on a GPU falls back to
    sequential with one log line; ``auto`` on a CPU is sequential; a ``batch-clients`` that does not fit is
    refused before training."""
    model = build_model("mlp", 64, 10, hidden=(32,))
    lbfgs = resolve({**BASE, "algorithm": "fedavg", "mode": "lbfgs", "client-engine": "batched"})
    with pytest.raises(ConfigError, match="mode 'lbfgs' is not batched"):
        batched_clients(lbfgs, model, "cpu")
    with pytest.raises(ConfigError, match="mode 'lbfgs' is not batched"):
        run_experiment(lbfgs, tmp_path / "lbfgs", progress=False)
    assert not (tmp_path / "lbfgs" / "metrics.jsonl").exists()
    auto = resolve({**BASE, "algorithm": "fedavg", "mode": "lbfgs"})
    with caplog.at_level(logging.INFO, logger="fedbayes"):
        assert batched_clients(auto, model, "cuda") is False
    assert [r.message for r in caplog.records if "client-engine auto" in r.message]
    assert batched_clients(resolve({**BASE, "algorithm": "bayes-admm"}), model, "cpu") is False
    assert batched_clients(resolve({**BASE, "algorithm": "bayes-admm"}), model, "cuda") is True
    huge = resolve({**BASE, "algorithm": "bayes-admm", "client-engine": "batched", "batch-clients": 10**9})
    with pytest.raises(ConfigError, match=r"batch-clients = 1000000000 needs about .* GiB"):
        batched_clients(huge, model, "cpu")


def test_batch_clients_is_checked_against_the_memory_there_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stacking, "_available_bytes", lambda device: 10 * 2**20)
    per = batched.client_bytes(178_110, 64, 310)
    assert per == 4 * (16 * 178_110 + 4 * 64 * 310)
    assert batched.chunk_size(0, 100, per, torch.device("cpu")) == 1  # at least one, even where none fits
    monkeypatch.setattr(stacking, "_available_bytes", lambda device: 64 * 2**30)
    assert batched.chunk_size(0, 100, per, torch.device("cpu")) == batched.CPU_CHUNK_BYTES // per == 4
    monkeypatch.setattr(stacking, "_available_bytes", lambda device: 10 * 2**20)
    with pytest.raises(ValueError, match="batch-clients = 3 needs about"):
        batched.chunk_size(3, 100, per, torch.device("cpu"))


def test_batched_engine_under_partial_participation_and_failures(tmp_path: Path) -> None:
    """Half the clients per round, a fail-rate and a hook that drops client 2 in round 2: the same participants,
    failures and (to 1e-5) posterior as the sequential engine; the failed clients never train in either."""
    out = {}
    rows = {}
    for eng in ("sequential", "batched"):
        cfg = {**BASE, "algorithm": "bayes-admm", **PER_ALGO["bayes-admm"], "num-clients": 6, "rounds": 4,
               "clients-per-round": 0.5, "fail-rate": 0.2, "client-engine": eng}
        rows[eng] = run_experiment(cfg, tmp_path / eng, progress=False, fail=lambda r, c: (r, c) == (2, 2))
        out[eng] = load_file(tmp_path / eng / "posterior.safetensors")
    for key in ("participants", "failed"):
        assert [r[key] for r in rows["sequential"]] == [r[key] for r in rows["batched"]]
    assert any(r["failed"] for r in rows["batched"])
    assert max(rel(out["sequential"][k], out["batched"][k]) for k in out["sequential"]) <= RTOL


@pytest.mark.parametrize(("name", "kw"), [
    ("mlp", {"hidden": (16, 8), "activation": "sigmoid"}), ("mlp", {"hidden": (16,), "activation": "relu"}),
    ("mlp", {"hidden": (16,), "activation": "tanh"}), ("mlp", {"hidden": (16,), "activation": "gelu"}),
    ("logreg", {}), ("linreg", {}),
])
def test_stacked_forward_is_each_clients_forward(name: str, kw: dict[str, Any]) -> None:
    """The stacked-weight network (and, for a model it does not know, vmap) gives each client's own forward."""
    models = [build_model(name, 12, 3, seed=s, **kw) for s in range(3)]
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    want = torch.stack([m(x[i]) for i, m in enumerate(models)])
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k, _ in
               models[0].named_parameters()}
    got = batched.stacked_forward(models[0])(stacked, x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    class Wrapped(nn.Module):  # not an nn.Sequential: the vmap path
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner(z)

    wrapped = {f"inner.{k}": v for k, v in stacked.items()}
    assert torch.allclose(batched.stacked_forward(Wrapped(models[0]))(wrapped, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_stacked_forward_vectorises_convolutions_and_group_norm(name: str) -> None:
    """The image models go through vmap of functional_call (convolutions, pooling, GroupNorm): each client's own
    forward, and the model passes check_batchable's trial forward on its stated input shape."""
    models = [build_model(name, 64, 10, seed=s, input_shape=(1, 8, 8)) for s in range(3)]
    check_batchable(models[0])
    x = torch.rand(3, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = torch.stack([m(x[i]) for i, m in enumerate(models)])
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k, _ in
               models[0].named_parameters()}
    torch.testing.assert_close(batched.stacked_forward(models[0])(stacked, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "kw"), [("bayes-admm", {}), ("fedavg", {"mode": "sgd", "lr": 0.05})])
def test_batched_engine_gives_the_sequential_posterior_on_the_cnn(name: str, kw: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    """The cnn on digit images (1×8×8), 4 clients of different sizes, 2 rounds: batched = sequential to 1e-5.

    FedAvg runs SGD: Adam divides each gradient by its own size, and where the cnn's gradient is at rounding level
    (ReLU units dead for a whole batch, zero-padded borders) that turns a 1-ulp difference into a step of lr
    (measured on one client: 1.2e-5 relative after ONE Adam step at lr 0.01, 9e-8 after 40 SGD steps)."""
    out = {}
    for eng in ("sequential", "batched"):
        cfg = {**BASE, "algorithm": name, **PER_ALGO.get(name, {}), **kw, "model": "cnn", "rounds": 2, "epochs": 1,
               "client-engine": eng}
        run_experiment(cfg, tmp_path / eng, progress=False)
        out[eng] = load_file(tmp_path / eng / "posterior.safetensors")
    seq, bat = out["sequential"], out["batched"]
    assert seq.keys() == bat.keys() and seq["mean/0.weight"].shape == (6, 1, 5, 5)
    errs = {k: rel(seq[k], bat[k]) for k in seq}
    assert max(errs.values()) <= RTOL, errs
