"""A user's own data and model (issue 24 §2): tensors of any shape and map-style Datasets train alike, regression,
``package.module:name`` import paths with each error, the one-forward shape check naming both shapes."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fedbayes.config import ConfigError, resolve
from fedbayes.data.user import UserDataError, check_fit, import_object
from fedbayes.federation import Federation, batched_clients
from fedbayes.gaussian import DiagGaussian
from fedbayes.local import LocalSettings, train_local


def _digits(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32).reshape(n, 1, 8, 8), torch.tensor(y[:n])


class Pairs(Dataset):
    """A map-style Dataset over tensors, with an optional transform of each input."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None) -> None:  # type: ignore[no-untyped-def]
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        x = self.x[i]
        return (self.transform(x) if self.transform else x), self.y[i]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def _train(model: nn.Module, x, y, **kw):  # type: ignore[no-untyped-def]
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    settings = LocalSettings(**{"lr": 0.05, "epochs": 2, "batch_size": 32, "seed": 7, **kw})
    return train_local(model, prior, x, y, settings)


@pytest.mark.parametrize("mode", ["ivon", "adam"])
def test_dataset_trains_exactly_as_equal_tensors(mode: str) -> None:
    """Same seed → the DataLoader's batches are the tensor path's permutation cut in the same places: bit-equal
    means and sites (IVON), also through a transform (x ↦ 2x) against tensors that hold 2x."""
    x, y = _digits()
    a = _train(_cnn(), x, y, mode=mode)
    b = _train(_cnn(), Pairs(x, y), None, mode=mode)
    c = _train(_cnn(), Pairs(x, y, transform=lambda t: 2 * t), None, mode=mode)
    d = _train(_cnn(), 2 * x, y, mode=mode)
    assert a.num_examples == b.num_examples == len(x)  # ess = the client's example count
    for k in a.mean:
        assert torch.equal(a.mean[k], b.mean[k]), k
        assert torch.equal(c.mean[k], d.mean[k]), k
        assert not torch.equal(a.mean[k], c.mean[k])  # the transform did act
    if mode == "ivon":
        assert a.site is not None and b.site is not None
        for k in a.mean:
            assert torch.equal(a.site.prec[k], b.site.prec[k]) and torch.equal(a.site.eta[k], b.site.eta[k])


def test_image_shaped_tensors_train_as_flat_ones_through_a_flattening_model() -> None:
    x, y = _digits()

    def mlp() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    a, b = _train(mlp(), x, y), _train(mlp(), x.reshape(len(x), 64), y)
    assert all(torch.equal(a.mean[k], b.mean[k]) for k in a.mean)


def test_laplace_site_of_a_dataset_equals_the_tensors_one() -> None:
    """Point mode + Laplace reads the whole Dataset once (the GGN needs every example)."""
    x, y = _digits(16)
    a = _train(_cnn(), x, y, mode="adam", laplace=True)
    b = _train(_cnn(), Pairs(x, y), None, mode="adam", laplace=True)
    assert a.site is not None and b.site is not None
    for k in a.mean:
        assert torch.allclose(a.site.prec[k], b.site.prec[k], rtol=1e-6, atol=0)


def test_regression_data_recovers_least_squares() -> None:
    """One client, FedAvg, full-batch L-BFGS on a Gaussian likelihood: the global mean is the least-squares fit
    (closed form (XᵀX)⁻¹Xᵀy with a bias column), with the client given as a Dataset."""
    import fedbayes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.7 + 0.1 * torch.randn(200, generator=g)
    model = nn.Linear(5, 1)
    res = fedbayes.run(fedbayes.FedAvg(), model, [Pairs(x, y)], test=(x[:50], y[:50]), rounds=1, task="regression",
                       local=LocalSettings(mode="lbfgs", lr=1.0, epochs=3), bma_samples=0)
    xa = torch.cat([x, torch.ones(200, 1)], 1).double()
    w = torch.linalg.solve(xa.T @ xa, xa.T @ y.double())
    got = torch.cat([res.mean["weight"].reshape(-1), res.mean["bias"]])
    assert torch.allclose(got, w, atol=1e-4)
    assert res.config["loss"] == "gaussian" and "test_rmse" in res.final


# ------------------------------------------------------------------------------------------- import paths
@pytest.fixture()
def usermod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``fb_user_mod`` on sys.path with good and bad factories and data functions."""
    (tmp_path / "fb_user_mod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from sklearn.datasets import load_digits
        from fedbayes.data.user import FederatedData

        def cnn(input_shape, num_outputs):
            return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * input_shape[1] * input_shape[2], num_outputs))

        def wide():
            return nn.Sequential(nn.Flatten(), nn.Linear(65, 10))

        def seven(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))

        def not_a_model():
            return {"weight": torch.zeros(3)}

        def digits(seed, num_clients):
            x, y = load_digits(return_X_y=True)
            x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
            y = torch.tensor(y)
            return FederatedData([(x[k:1200:num_clients], y[k:1200:num_clients]) for k in range(num_clients)],
                                 test=(x[1200:], y[1200:]))

        def a_list():
            return [1, 2]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fb_user_mod"
    sys.modules.pop("fb_user_mod", None)


BASE = {"algorithm": "fedavg", "dataset": "digits", "num-clients": 3, "rounds": 1, "device": "cpu", "mode": "adam",
        "lr": 0.01, "bma-samples": 0}


def test_import_path_model_and_data_run(usermod: str, tmp_path: Path) -> None:
    from fedbayes.engine import run_experiment

    fed = Federation.build(resolve({**BASE, "model": f"{usermod}:cnn"}))
    assert fed.model[0].weight.shape == (4, 1, 3, 3)  # built for digits' (1, 8, 8) images
    rows = run_experiment({**BASE, "model": f"{usermod}:cnn", "data": f"{usermod}:digits"}, tmp_path / "r",
                          progress=False)
    assert len(rows) == 1 and 0.0 <= rows[0]["test_accuracy"] <= 1.0
    assert '"data": "fb_user_mod:digits"' in (tmp_path / "r" / "config.json").read_text()


@pytest.mark.parametrize(("flat", "expect"), [
    ({"model": "no_such_pkg.sub:f"}, "module 'no_such_pkg' not found"),
    ({"model": "fb_user_mod:nope"}, "module 'fb_user_mod' has no attribute 'nope'"),
    ({"model": "fb_user_mod:not_a_model"}, "returned a dict, expected a torch.nn.Module"),
    ({"model": "fb_user_mod:wide"}, "examples of shape (1, 8, 8)"),
    ({"model": "fb_user_mod:seven"}, "output shape (2, 7), but (2, 10) for 10 classes"),
    ({"data": "fb_user_mod:a_list"}, "returned a list; expected a fedbayes.FederatedData"),
    ({"data": "fb_user_mod:digits", "num-clients": 4, "model": "fb_user_mod:cnn"}, None),
])
def test_import_path_errors_name_the_problem(usermod: str, flat: dict, expect: str | None) -> None:
    if expect is None:  # the data function gets num-clients and must return that many
        assert len(Federation.build(resolve({**BASE, **flat})).client_data) == 4
        return
    with pytest.raises(UserDataError) as err:
        Federation.build(resolve({**BASE, **flat}))
    assert expect in str(err.value)


def test_config_refuses_a_model_that_is_neither_a_name_nor_a_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'convnet'.*import path"):
        resolve({"model": "convnet"})
    with pytest.raises(ConfigError, match="data must be an import path"):
        resolve({"data": "digits"})
    with pytest.raises(UserDataError, match="expected an import path"):
        import_object("just_a_module", "model")


def test_shape_check_names_both_shapes() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(UserDataError) as err:
        check_fit(model, torch.zeros(2, 1, 8, 8), "classification", 10)
    msg = str(err.value)
    assert "(1, 8, 8)" in msg and "784" in msg  # the data's example shape and the model's (torch: 2x64 and 784x10)
    with pytest.raises(UserDataError, match=r"\(2, 10\).*\(2,\) or \(2, 1\) for regression"):
        check_fit(nn.Linear(3, 10), torch.zeros(2, 3), "regression", 1)
    check_fit(nn.Linear(3, 1), torch.zeros(2, 3), "regression", 1)  # fits: no error


def test_batched_engine_refuses_dataset_clients_and_auto_falls_back() -> None:
    x, y = _digits(40)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    exp = resolve({**BASE, "client-engine": "batched"})
    with pytest.raises(ConfigError, match=r"clients \[1\] are torch Datasets"):
        batched_clients(exp, model, "cpu", [(x, y), Pairs(x, y)])
    assert batched_clients(exp, model, "cpu", [(x, y), (x, y)])
    assert not batched_clients(resolve({**BASE, "client-engine": "auto"}), model, "cuda", [Pairs(x, y)])
