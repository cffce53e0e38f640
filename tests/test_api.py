"""The Python API (issue 24 §3): ``fedbayes.run`` writes the command's results folder, resumes exactly, refuses a
resume with another model or data naming the difference; the rules; IVON as a plain torch-style optimiser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fedbayes
from fedbayes.config import ConfigError


def _data(n_clients: int = 3) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    return [(x[k:600:n_clients], y[k:600:n_clients]) for k in range(n_clients)], (x[1400:], y[1400:])


def _model(hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


KW = {"local": fedbayes.LocalSettings(lr=0.1, batch_size=32), "bma_samples": 4}


def test_run_writes_the_folder_and_resume_continues_exactly(tmp_path: Path) -> None:
    clients, test = _data()
    full = fedbayes.run(fedbayes.BayesADMM(rho_k=2.0), _model(), clients, test=test, rounds=3, out=tmp_path / "a",
                        **KW)
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"config.json", "metrics.jsonl", "posterior.safetensors",
                                                              "checkpoint"}
    assert [r["round"] for r in full.metrics] == [1, 2, 3] and full.folder == tmp_path / "a"
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["algorithm"] == "bayes-admm" and cfg["model"] == cfg["data"] == "python" and cfg["rho-k"] == 2.0
    assert cfg["provenance"]["model"]["parameters"]["1.weight"] == [16, 64]
    assert cfg["provenance"]["data"]["sizes"] == [len(c[0]) for c in clients]
    post = load_file(str(tmp_path / "a" / "posterior.safetensors"))
    assert full.posterior is not None and torch.equal(post["prec/1.weight"], full.posterior.prec["1.weight"])
    # two rounds, then the script builds the same model again and resumes to three: identical to the straight run
    fedbayes.run(fedbayes.BayesADMM(rho_k=2.0), _model(), clients, test=test, rounds=2, out=tmp_path / "b", **KW)
    more = fedbayes.run(fedbayes.BayesADMM(rho_k=2.0), _model(), clients, test=test, rounds=3, out=tmp_path / "b",
                        resume=True, **KW)
    assert [r["round"] for r in more.metrics] == [1, 2, 3]
    assert more.posterior is not None
    for k in full.mean:
        assert torch.equal(full.mean[k], more.mean[k]) and torch.equal(full.posterior.prec[k], more.posterior.prec[k])
    assert more.metrics[-1]["test_accuracy"] == full.metrics[-1]["test_accuracy"]
    # the model object holds the global mean at the end
    model = _model()
    fedbayes.run(fedbayes.FedAvg(), model, clients, test=test, rounds=1, **KW)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters(), strict=True))


def test_resume_with_another_model_or_data_is_refused_naming_it(tmp_path: Path) -> None:
    clients, test = _data()
    out = tmp_path / "r"
    fedbayes.run(fedbayes.FedAvg(), _model(), clients, test=test, rounds=1, out=out, **KW)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        fedbayes.run(fedbayes.FedAvg(), _model(hidden=8), clients, test=test, rounds=2, out=out, resume=True, **KW)
    assert "parameter '1.weight' has shape (8, 64) now, (16, 64) in the run" in str(err.value)
    fewer = [clients[0], clients[1], (clients[2][0][:-1], clients[2][1][:-1])]
    with pytest.raises(ConfigError, match="client 2 has 199 examples now, 200 in the run"):
        fedbayes.run(fedbayes.FedAvg(), _model(), fewer, test=test, rounds=2, out=out, resume=True, **KW)
    with pytest.raises(ConfigError, match="lr"):  # another setting: the resume comparison names the key
        fedbayes.run(fedbayes.FedAvg(), _model(), clients, test=test, rounds=2, out=out, resume=True,
                     local=fedbayes.LocalSettings(lr=0.5), bma_samples=4)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing was written


def test_rules_check_their_hyperparameters() -> None:
    assert fedbayes.BayesADMM(rho=0.2, prior_prec=2.0).hyperparameters == {"rho": 0.2, "prior-prec": 2.0}
    assert fedbayes.Rule.of("fedprox", mu=0.1).algorithm == "fedprox"
    with pytest.raises(ConfigError, match=r"unknown hyperparameter 'rhoo'; did you mean 'rho'"):
        fedbayes.BayesADMM(rhoo=0.2)
    with pytest.raises(ConfigError, match="damping"):
        fedbayes.BayesADMM(damping=2.0)
    with pytest.raises(ConfigError, match="seed"):
        fedbayes.run(fedbayes.FedAvg(), _model(), *_data()[:1], test=_data()[1],
                     local=fedbayes.LocalSettings(seed=3))


def test_ivon_is_a_torch_style_optimiser_on_a_toy_regression() -> None:
    """y = 2x − 1 + 0.1ε: IVON with step(closure) (sampling inside, as ivon-opt's users write it) finds the
    least-squares line, and its posterior standard deviation is small (ess = N)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, generator=g) * 2 - 1
    y = 2 * x - 1 + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    opt = fedbayes.IVON([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}], lr=0.2, ess=256,
                        hess_init=0.1, weight_decay=1e-4)
    for _ in range(400):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() / (2 * 0.01)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert loss is not None and math.isfinite(float(loss.detach()))
    xa = torch.cat([x, torch.ones_like(x)], 1)
    w = torch.linalg.lstsq(xa, y).solution.reshape(-1)
    fitted = (float(model.weight.detach()), float(model.bias.detach()))
    assert abs(fitted[0] - float(w[0])) < 0.02 and abs(fitted[1] - float(w[1])) < 0.02
    _, precs = opt.posterior()
    assert all(float((1 / p.sqrt()).max()) < 0.05 for p in precs)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.2
