"""DiagGaussian: algebra in natural parameters, conversions, validation errors."""

from __future__ import annotations

import math

import pytest
import torch

from fedbayes.gaussian import DiagGaussian


def _g(m: list[float], s: list[float]) -> DiagGaussian:
    return DiagGaussian.from_mean_prec({"w": torch.tensor(m, dtype=torch.float64)},
                                       {"w": torch.tensor(s, dtype=torch.float64)})


def test_product_of_gaussians_by_hand() -> None:
    # N(1, 1/2) × N(3, 1/6): precision 8, mean (2·1 + 6·3)/8 = 2.5
    prod = _g([1.0], [2.0]) + _g([3.0], [6.0])
    assert prod.prec["w"].item() == 8.0
    assert prod.mean()["w"].item() == pytest.approx(2.5)
    assert prod.var()["w"].item() == pytest.approx(0.125)
    cavity = prod - _g([3.0], [6.0])
    assert cavity.mean()["w"].item() == pytest.approx(1.0)
    damped = _g([1.0], [2.0]).scale(0.25)
    assert damped.prec["w"].item() == 0.5 and damped.mean()["w"].item() == pytest.approx(1.0)


def test_flatten_roundtrip_and_isotropic() -> None:
    tmpl = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    g = DiagGaussian.isotropic(tmpl, 2.0, mean={"a": torch.ones(2, 3), "b": -torch.ones(4)})
    e, s = g.flatten()
    assert e.shape == (10,) and float(s.sum()) == 20.0
    back = DiagGaussian.unflatten(e, s, g.shapes)
    assert torch.equal(back.eta["a"], g.eta["a"]) and back.names == ["a", "b"]
    assert torch.allclose(back.mean()["b"], -torch.ones(4, dtype=torch.float64))


def test_sample_moments() -> None:
    g = _g([1.0, -2.0], [4.0, 0.25])
    draws = torch.stack([d["w"] for d in g.sample(torch.Generator().manual_seed(0), n=20000)])
    assert torch.allclose(draws.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64), atol=0.05)
    assert torch.allclose(draws.var(0), torch.tensor([0.25, 4.0], dtype=torch.float64), rtol=0.05)


def test_validate_errors_name_parameter() -> None:
    bad = DiagGaussian({"w": torch.tensor([1.0, math.nan])}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="'w' eta has non-finite"):
        bad.validate()
    neg = DiagGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match="'w' precision must be >= 0"):
        neg.validate()
    with pytest.raises(ValueError, match="'w': precision must be > 0"):
        neg.mean()
    ok = _g([1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        ok.validate({"w": (3,)})
    with pytest.raises(ValueError, match="missing"):
        ok.validate({"v": (2,)})
    with pytest.raises(ValueError, match="names differ"):
        ok + DiagGaussian({"v": torch.zeros(2, dtype=torch.float64)}, {"v": torch.zeros(2, dtype=torch.float64)})


def test_clamp_prec_keeps_mean() -> None:
    g = _g([2.0, -1.0], [1e-9, 3.0]).clamp_prec(1e-3)
    assert torch.allclose(g.mean()["w"], torch.tensor([2.0, -1.0], dtype=torch.float64))
    assert float(g.prec["w"][0]) == pytest.approx(1e-3)
