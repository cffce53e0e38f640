"""IVON: oracle match with ivon-opt, exact posterior on a quadratic, site/posterior algebra, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fedbayes.ivon import IVON


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def test_matches_ivon_opt_step_for_step() -> None:
    ivon_ref = pytest.importorskip("ivon")
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    ours_m, ref_m = _mlp(0), _mlp(0)
    kw = dict(lr=0.05, ess=64.0, hess_init=0.3, beta1=0.9, beta2=0.99, weight_decay=1e-3)
    ours = IVON(ours_m.parameters(), **kw)
    ref = ivon_ref.IVON(ref_m.parameters(), rescale_lr=False, mc_samples=2, **kw)
    for step in range(25):
        for _ in range(2):  # two MC samples per step, identical global-RNG draws
            torch.manual_seed(1000 * step + _)
            with ours.sampled_params(train=True):
                ours_m.zero_grad()
                torch.nn.functional.cross_entropy(ours_m(x), y).backward()
            torch.manual_seed(1000 * step + _)
            with ref.sampled_params(train=True):
                ref_m.zero_grad()
                torch.nn.functional.cross_entropy(ref_m(x), y).backward()
        ours.step()
        ref.step()
        for a, b in zip(ours_m.parameters(), ref_m.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), f"mean differs at step {step}"
    h_ref = ref.param_groups[0]["hess"]
    h_ours = torch.cat([h.reshape(-1) for h in ours.hess()])
    assert torch.allclose(h_ours, h_ref, atol=1e-6, rtol=0)
    assert ours.current_step == 25


def test_vector_prior_quadratic_converges_to_exact_posterior() -> None:
    # loss ℓ̄(θ) = ½ Σ a_i (θ_i − c_i)²; target ess·ℓ̄ + KL(q‖N(m0, 1/p0)):
    # exact posterior precision Λ = ess·a + p0, mean = (ess·a·c + p0·m0)/Λ
    g = torch.Generator().manual_seed(0)
    d, ess = 6, 50.0
    a = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.5
    c = torch.randn(d, generator=g, dtype=torch.float64)
    p0 = torch.rand(d, generator=g, dtype=torch.float64) * 40 + 5
    m0 = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = IVON([theta], lr=0.05, ess=ess, hess_init=1.0, beta1=0.9, beta2=0.999, antithetic=True,
               generator=torch.Generator().manual_seed(3))
    opt.set_prior([p0 * m0], [p0])
    for _ in range(6000):
        for _s in range(2):
            with opt.sampled_params(train=True):
                theta.grad = None
                (0.5 * (a * (theta - c) ** 2).sum()).backward()
        opt.step()
    mean, prec = opt.posterior()
    exact_prec = ess * a + p0
    exact_mean = (ess * a * c + p0 * m0) / exact_prec
    assert torch.allclose(mean[0], exact_mean, atol=1e-2)
    assert torch.all((prec[0] / exact_prec - 1).abs() < 0.10)


def test_site_is_posterior_over_prior_and_floored() -> None:
    theta = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    opt = IVON([theta], lr=0.1, ess=10.0)
    opt.set_prior([torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)], [torch.tensor([2.0, 3.0, 4.0],
                                                                                         dtype=torch.float64)])
    opt.set_hess([torch.tensor([0.7, -0.05, 0.0], dtype=torch.float64)])
    (eta_s,), (prec_s,) = opt.site()
    # s̃ = ess·h floored at 0; η̃ = s̃ m + s_π m − η_π
    assert torch.allclose(prec_s, torch.tensor([7.0, 0.0, 0.0], dtype=torch.float64))
    expect_eta = prec_s * theta.detach() + torch.tensor([2.0, 3.0, 4.0]) * theta.detach() - torch.tensor(
        [1.0, 0.0, -2.0])
    assert torch.allclose(eta_s, expect_eta.double())
    # prior + site has mean m exactly
    post_mean = (torch.tensor([1.0, 0.0, -2.0]) + eta_s) / (torch.tensor([2.0, 3.0, 4.0]) + prec_s)
    assert torch.allclose(post_mean, theta.detach())


def test_no_grad_parameter_and_state_dict_step() -> None:
    used = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(2))
    opt = IVON([used, unused], lr=0.1, ess=5.0)
    for _ in range(3):
        with opt.sampled_params(train=True):
            used.grad = None
            (used**2).sum().backward()
        opt.step()
    assert torch.isfinite(unused).all() and torch.isfinite(used).all()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["step"] == 3
    opt2 = IVON([used, unused], lr=0.1, ess=5.0)
    opt2.load_state_dict(sd)
    assert opt2.current_step == 3


def test_step_without_samples_raises() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = IVON([p], lr=0.1, ess=2.0)
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()


@pytest.mark.parametrize("kw", [dict(lr=0.0), dict(lr=-1.0), dict(ess=0.0), dict(ess=math.nan),
                                dict(beta2=1.0), dict(mc_samples=0)])
def test_bad_hyperparameters(kw: dict) -> None:
    args = dict(lr=0.1, ess=10.0)
    args.update(kw)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        IVON([torch.nn.Parameter(torch.ones(2))], **args)


def test_set_prior_rejects_nan_and_shape() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = IVON([p], lr=0.1, ess=2.0)
    with pytest.raises(ValueError, match="non-finite"):
        opt.set_prior([torch.zeros(2)], [torch.tensor([1.0, math.nan])])
    with pytest.raises(ValueError, match="shape"):
        opt.set_prior([torch.zeros(3)], [torch.ones(3)])
