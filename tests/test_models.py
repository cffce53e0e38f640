"""Any torch model (issue 24 §1): the built-in image models, images kept as images, and every part of fedbayes on a
model with convolutional (4-D), 1-D and embedding parameters; models with running statistics refused before
training, naming the module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import fedbayes.federation as federation
from fedbayes.algorithms import algorithm_names
from fedbayes.batched import check_batchable, train_batched
from fedbayes.curvature import diag_ggn
from fedbayes.data import load_dataset
from fedbayes.engine import run_experiment
from fedbayes.gaussian import DiagGaussian
from fedbayes.local import LocalSettings, StatefulModelError, train_local
from fedbayes.models import build_model


class Mixed(nn.Module):
    """conv (4-D weight) → GroupNorm (1-D) → pool → linear, plus an embedding looked up by the image's mean
    brightness, → LayerNorm → linear: every kind of parameter the issue names, on 1×8×8 images."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.emb = nn.Embedding(4, 6)
        self.proj = nn.Linear(48, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1)
        ids = (x.mean(dim=(1, 2, 3)) * 8).long().clamp(0, 3)
        return self.fc(torch.tanh(self.ln(self.proj(h) + self.emb(ids))))


def _mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed()


def _digits(n: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    d = load_dataset("digits")
    return torch.from_numpy(d.x_train[offset : offset + n]), torch.from_numpy(d.y_train[offset : offset + n])


# ------------------------------------------------------------------------------------------------ data and models
def test_image_datasets_keep_their_images() -> None:
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.num_features == 64
    raw = load_dataset("digits", raw_pixels=True)
    assert np.array_equal(raw.x_train / np.float32(16.0), d.x_train)


@pytest.mark.parametrize("name", ["mlp", "logreg", "linreg"])
def test_flat_models_flatten_inside_so_images_and_vectors_give_the_same_bits(name: str) -> None:
    x, _ = _digits(20)
    m = build_model(name, 64, 10, seed=3, input_shape=(1, 8, 8))
    assert torch.equal(m(x), m(x.reshape(20, 64)))


@pytest.mark.parametrize(("shape", "fc_in"), [((1, 8, 8), 16 * 2 * 2), ((1, 28, 28), 16 * 7 * 7), ((3, 32, 32), 1024)])
def test_cnn_is_flowers_quickstart_net_with_same_padding(shape: tuple[int, int, int], fc_in: int) -> None:
    m = build_model("cnn", math.prod(shape), 10, input_shape=shape)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    fcs = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (shape[0], 6, (5, 5), (2, 2)), (6, 16, (5, 5), (2, 2))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(fc_in, 120), (120, 84), (84, 10)]
    assert m(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_resnet20_has_20_weighted_layers_and_group_norm(shape: tuple[int, int, int]) -> None:
    m = build_model("resnet20", math.prod(shape), 7, input_shape=shape)
    convs3 = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    shortcuts = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1)]
    fcs = [f for f in m.modules() if isinstance(f, nn.Linear)]
    assert len(convs3) + len(fcs) == 20 and len(shortcuts) == 2  # 1 + 3·3·2 convolutions + fc; 2 downsamplings
    assert sorted({c.out_channels for c in convs3}) == [16, 32, 64]
    assert not list(m.buffers())
    assert all(g.num_groups == 2 for g in m.modules() if isinstance(g, nn.GroupNorm))
    assert not any(isinstance(b, nn.modules.batchnorm._NormBase) for b in m.modules())
    assert m(torch.zeros(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize(("name", "shape"), [("cnn", None), ("cnn", (64,)), ("resnet20", (1, 2, 32))])
def test_image_models_need_an_image_shape(name: str, shape: tuple[int, ...] | None) -> None:
    with pytest.raises(ValueError, match=f"model '{name}' takes images"):
        build_model(name, 64, 10, input_shape=shape)


# ------------------------------------------------------------------------------------------------ any shapes
def test_mixed_model_has_every_kind_of_parameter() -> None:
    shapes = {k: tuple(v.shape) for k, v in _mixed().named_parameters()}
    assert shapes["conv.weight"] == (3, 1, 3, 3) and shapes["norm.weight"] == (3,) and shapes["emb.weight"] == (4, 6)


@pytest.mark.parametrize(("mode", "laplace"), [("ivon", False), ("adam", True), ("sgd", False)])
def test_train_local_and_batched_agree_on_any_parameter_shapes(mode: str, laplace: bool) -> None:
    """Two clients under their own priors and warm starts: the batched path gives train_local's mean and site,
    parameter by parameter in each parameter's own shape."""
    model = _mixed()
    named = {k: v.detach().clone() for k, v in model.named_parameters()}
    specs = []
    for i, n in enumerate((40, 70)):
        x, y = _digits(n, offset=100 * i)
        g = torch.Generator().manual_seed(i)
        prior = DiagGaussian({k: 0.1 * torch.randn(v.shape, generator=g) for k, v in named.items()},
                             {k: torch.full(v.shape, 0.5 + i) for k, v in named.items()})
        start = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in named.items()}
        sp = {k: torch.full(v.shape, 200.0) for k, v in named.items()} if mode == "ivon" else None
        s = LocalSettings(mode=mode, lr=0.01, epochs=2, batch_size=16, seed=7 + i, laplace=laplace, signed_site=True)
        specs.append((prior, x, y, s, start, sp))
    seq = [train_local(model, p, x, y, s, start_mean=sm, start_prec=sp) for p, x, y, s, sm, sp in specs]
    bat = train_batched(model, specs)
    for a, b in zip(seq, bat, strict=True):
        assert not isinstance(b, Exception)
        assert {k: tuple(v.shape) for k, v in a.mean.items()} == {k: tuple(v.shape) for k, v in named.items()}
        for k in named:
            torch.testing.assert_close(b.mean[k], a.mean[k], rtol=1e-5, atol=1e-6)
        assert (a.site is None) == (b.site is None) == (mode == "sgd")
        if a.site is not None and b.site is not None:
            assert a.site.shapes == {k: tuple(v.shape) for k, v in named.items()}
            for k in named:
                torch.testing.assert_close(b.site.prec[k], a.site.prec[k], rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(b.site.eta[k], a.site.eta[k], rtol=1e-5, atol=1e-4)


def test_generic_ggn_is_the_sum_of_per_example_jacobian_products() -> None:
    """diag GGN of the summed cross-entropy = Σᵢ diag(Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ), per parameter, in its shape
    (Jacobians by torch.autograd.functional, one example at a time)."""
    model = _mixed().double()
    x, _ = _digits(5)
    x = x.double()
    params = dict(model.named_parameters())
    got = diag_ggn(model, params, x, "ce")
    names = list(params)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        def f(*ps: Tensor, xi: Tensor = x[i : i + 1]) -> Tensor:
            return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (xi,))[0]

        jac = torch.autograd.functional.jacobian(f, tuple(params[k].detach() for k in names))
        with torch.no_grad():
            p = model(x[i : i + 1])[0].softmax(-1)
        lam = torch.diag(p) - torch.outer(p, p)
        for k, j in zip(names, jac, strict=True):
            jf = j.reshape(len(p), -1)
            want[k] += torch.einsum("ca,cd,da->a", jf, lam, jf).reshape(want[k].shape)
    for k in names:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)


TINY: dict[str, Any] = {
    "dataset": "digits", "num-clients": 3, "partition": "iid", "rounds": 2, "epochs": 1, "max-steps": 3,
    "batch-size": 16, "device": "cpu", "seed": 0, "bma-samples": 2, "lr": 0.01,
}


@pytest.mark.parametrize("name", algorithm_names())
def test_every_rule_runs_a_model_of_any_shapes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every server rule, the wire format and the disk store on the mixed model: 2 rounds; the posterior has every
    parameter in its own shape and is finite."""
    monkeypatch.setattr(federation, "make_model", lambda exp, data: _mixed(exp.run.seed))
    cfg = {**TINY, "algorithm": name, "store": "disk"}
    if name in ("fedprox", "feddyn"):
        cfg["mode"] = "sgd"
    rows = run_experiment(cfg, tmp_path / name, progress=False)
    assert [r["participants"] for r in rows] == [[0, 1, 2]] * 2 and not any(r["failed"] for r in rows)
    post = load_file(tmp_path / name / "posterior.safetensors")
    shapes = {k: tuple(v.shape) for k, v in _mixed().named_parameters()}
    assert {k: tuple(v.shape) for k, v in post.items() if k.startswith("mean/")} == {f"mean/{k}": s for k, s in
                                                                                     shapes.items()}
    assert all(bool(torch.isfinite(v).all()) for v in post.values())


def test_a_resumed_cnn_run_ends_bit_identical(tmp_path: Path) -> None:
    """cnn on digit images, bayes-admm: stop after round 1 and resume = the uninterrupted run."""
    cfg = {**TINY, "algorithm": "bayes-admm", "model": "cnn"}
    run_experiment(cfg, tmp_path / "whole", progress=False)
    run_experiment(cfg, tmp_path / "split", progress=False, stop_round=1)
    run_experiment(cfg, tmp_path / "split", progress=False, resume=True)
    a = load_file(tmp_path / "whole" / "posterior.safetensors")
    b = load_file(tmp_path / "split" / "posterior.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["mean/0.weight"].shape == (6, 1, 5, 5)


def test_fedbayes_run_with_the_cnn_on_digits(tmp_path: Path) -> None:
    from fedbayes.cli import main

    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--model", "cnn", "--clients", "4", "--rounds", "2", "--out", str(out),
            "--quiet", "--set", "max-steps=2", "--set", "bma-samples=2"]
    assert main(argv) == 0
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    assert '"model": "cnn"' in (out / "config.json").read_text()


# ------------------------------------------------------------------------------------------------ refusals
class _Convs(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("path", ["sequential", "batched"])
def test_batch_norm_is_refused_before_training_naming_the_module(path: str) -> None:
    model = _Convs(nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _digits(8)
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    s = LocalSettings(mode="ivon", batch_size=4)
    with pytest.raises(StatefulModelError, match=r"module 'features\.1' \(BatchNorm2d\).*nn\.GroupNorm"):
        if path == "sequential":
            train_local(model, prior, x, y, s)
        else:
            train_batched(model, [(prior, x, y, s, None, None)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained, nothing moved
    with pytest.raises(StatefulModelError, match=r"features\.1"):
        check_batchable(model)


def test_group_norm_and_untracked_norms_are_accepted() -> None:
    x, y = _digits(8)
    for norm in (nn.GroupNorm(2, 4), nn.BatchNorm2d(4, track_running_stats=False)):
        model = _Convs(norm)
        prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
        res = train_local(model, prior, x, y, LocalSettings(mode="adam", lr=0.01, batch_size=4))
        assert res.metrics["steps"] == 2.0


class _Counter(nn.Module):
    """A buffer that a forward changes in place (a stand-in for state the check does not know by its class)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x.flatten(1))


def test_a_buffer_that_changes_in_training_is_an_error_naming_it() -> None:
    model = nn.Sequential(_Counter())
    x, y = _digits(8)
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    with pytest.raises(StatefulModelError, match=r"buffer '0\.calls' of module '0' \(_Counter\) changed"):
        train_local(model, prior, x, y, LocalSettings(mode="adam", batch_size=4))
