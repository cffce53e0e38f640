"""The flat optimisers match torch.optim step for step; state round-trips."""

from __future__ import annotations

import pytest
import torch

from fedbayes.optim import SGD, Adam


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


@pytest.mark.parametrize("kind", ["adam", "sgd", "sgd-momentum"])
def test_matches_torch_optim(kind: str) -> None:
    a, b = _net(), _net()
    if kind == "adam":
        ours, ref = Adam(a.parameters(), lr=0.01, betas=(0.8, 0.99)), torch.optim.Adam(b.parameters(), lr=0.01,
                                                                                        betas=(0.8, 0.99))
    else:
        mom = 0.9 if kind == "sgd-momentum" else 0.0
        ours, ref = SGD(a.parameters(), lr=0.05, momentum=mom), torch.optim.SGD(b.parameters(), lr=0.05,
                                                                                 momentum=mom)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(30):
        for net, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            (net(x) ** 2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-12, rtol=1e-10)


def test_state_dict_roundtrip_and_errors() -> None:
    a = _net()
    opt = Adam(a.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        a(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
        opt.step()
    sd = opt.state_dict()
    b = _net()
    opt_b = Adam(b.parameters(), lr=0.01)
    opt_b.load_state_dict(sd)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert opt_b.param_groups[0]["step"] == 3
    with pytest.raises(ValueError, match="lr"):
        Adam(_net().parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
