"""The local trainer: conjugate exactness of Laplace sites, float32 vs float64 sites, IVON runs, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fedbayes.curvature import diag_ggn
from fedbayes.gaussian import DiagGaussian
from fedbayes.local import LocalSettings, train_local
from fedbayes.models import build_model


def _orthogonal_client(rng: torch.Generator, d: int, n_pairs: int, w: torch.Tensor, noise: float):
    # rows ±c·e_j: XᵀX is diagonal and Σᵢ xᵢ = 0, so the bias decouples -> the exact posterior is diagonal
    js = torch.randint(0, d, (n_pairs,), generator=rng)
    cs = torch.rand(n_pairs, generator=rng, dtype=torch.float64) + 0.5
    x = torch.zeros(2 * n_pairs, d, dtype=torch.float64)
    x[torch.arange(n_pairs), js] = cs
    x[torch.arange(n_pairs) + n_pairs, js] = -cs
    y = x @ w + 0.3 + noise * torch.randn(2 * n_pairs, generator=rng, dtype=torch.float64)
    return x, y


def test_conjugate_sites_sum_to_centralized_posterior() -> None:
    rng = torch.Generator().manual_seed(0)
    d, noise_var, delta = 4, 0.5, 2.0
    w = torch.randn(d, generator=rng, dtype=torch.float64)
    clients = [_orthogonal_client(rng, d, 6 + 3 * k, w, 0.7) for k in range(5)]
    model = build_model("linreg", d, 1).double()
    tmpl = dict(model.named_parameters())
    prior = DiagGaussian.isotropic(tmpl, delta)
    settings = LocalSettings(mode="lbfgs", lr=1.0, epochs=3, loss="gaussian", noise_var=noise_var, laplace=True)
    total = prior
    for x, y in clients:
        res = train_local(model, prior, x, y, settings)
        assert res.site is not None
        total = total + res.site
    # centralized exact posterior: Λ = XᵀX/σ² + δ (diagonal by construction), η = Xᵀy/σ²
    x = torch.cat([c[0] for c in clients])
    y = torch.cat([c[1] for c in clients])
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    gram = xa.T @ xa / noise_var
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros_like(gram), atol=1e-12)
    prec = torch.diag(gram) + delta
    eta = xa.T @ y / noise_var
    got_prec = torch.cat([total.prec["1.weight"].reshape(-1), total.prec["1.bias"]])
    got_eta = torch.cat([total.eta["1.weight"].reshape(-1), total.eta["1.bias"]])
    assert torch.allclose(got_prec, prec, atol=1e-8, rtol=0)
    # η depends on the solver's optimum (L-BFGS stops at ~1e-10 relative in float64): relative 1e-8
    assert torch.allclose(got_eta, eta, atol=1e-8, rtol=1e-8)


def _digits(n: int = 300):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def test_float32_site_matches_float64_reference() -> None:
    # A strong prior centred near the solution is where s_post·m − η_π would cancel in float32; the trainer
    # forms η̃ = s̃ m + s_π (m − m_π) instead. Reference: the same formula in float64 from the returned mean.
    x, y = _digits()
    model = build_model("logreg", 64, 10, seed=1)
    tmpl = dict(model.named_parameters())
    center = {k: v.detach().double() + 3.0 for k, v in tmpl.items()}
    prior = DiagGaussian.isotropic(tmpl, 1e4, mean=center)
    wire = prior.to(torch.float32)  # what travels
    for settings in (LocalSettings(mode="ivon", lr=0.05, epochs=2, hess_init=0.5, seed=0),
                     LocalSettings(mode="lbfgs", lr=1.0, epochs=1, laplace=True)):
        res = train_local(model, wire, x, y, settings)
        assert res.site is not None
        for k in tmpl:
            m = res.mean[k].double()
            s_site = res.site.prec[k].double()
            s_pi, c = wire.prec[k].double(), wire.eta[k].double() / wire.prec[k].double()
            ref_eta = s_site * m + s_pi * (m - c)
            scale = float((s_pi * (m - c)).abs().max() + (s_site * m).abs().max())
            err = float((res.site.eta[k].double() - ref_eta).abs().max())
            assert err <= 1e-12 * scale, (settings.mode, k, err, scale)
            naive = ((wire.prec[k] + s_site.float()) * res.mean[k] - wire.eta[k]).double()
            # the naive float32 difference is much worse: this is what the direct form avoids
            assert float((naive - ref_eta).abs().max()) > 10 * err


def test_diag_ggn_matches_brute_force() -> None:
    x, _ = _digits(20)
    model = build_model("mlp", 64, 10, hidden=(5,), activation="tanh", seed=0).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = diag_ggn(model, params, x.double())
    # brute force: Σᵢ Jᵢᵀ (diag p − ppᵀ) Jᵢ diagonal with torch.autograd.functional.jacobian
    flat = torch.cat([v.reshape(-1) for v in params.values()])
    shapes = {k: v.shape for k, v in params.items()}

    def out(theta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        p, i = {}, 0
        for k, s in shapes.items():
            n = int(torch.Size(s).numel())
            p[k] = theta[i : i + n].reshape(s)
            i += n
        return torch.func.functional_call(model, p, (xi[None],))[0]

    total = torch.zeros_like(flat)
    for xi in x.double():
        jac = torch.autograd.functional.jacobian(lambda t, xi=xi: out(t, xi), flat)
        p = out(flat, xi).softmax(-1)
        lam = torch.diag(p) - torch.outer(p, p)
        total += torch.diag(jac.T @ lam @ jac)
    got_flat = torch.cat([v.reshape(-1) for v in got.values()])
    assert torch.allclose(got_flat, total, atol=1e-10)
    # the Linear-layer fast path ((δ²)ᵀ(a²) per factor column; used when params are the model's own) agrees
    fast = diag_ggn(model, dict(model.named_parameters()), x.double())
    assert torch.allclose(torch.cat([v.reshape(-1) for v in fast.values()]), total, atol=1e-10)
    gauss = build_model("linreg", 64, 1, seed=0).double()
    xd = x.double()
    g_fast = diag_ggn(gauss, dict(gauss.named_parameters()), xd, loss="gaussian", noise_var=0.5)
    assert torch.allclose(g_fast["1.weight"][0], (xd**2).sum(0) / 0.5, atol=1e-10)
    assert float(g_fast["1.bias"][0]) == pytest.approx(len(xd) / 0.5)


@pytest.mark.parametrize("loss", ["ce", "gaussian"])
def test_diag_ggn_fast_path_on_convolutions_equals_the_generic_path(loss: str) -> None:
    """The Conv2d fast path (unfolded inputs, per-example products δᵢuᵢᵀ; used when params are the model's own)
    equals the generic per-example-Jacobian path (given detached copies) to 1e-9 in float64: a tiny network with
    stride, dilation, asymmetric kernels and padding, a conv without bias, several outputs (the Gaussian GGN is
    Σ_c J_c²/σ², not (Σ_c J_c)²/σ²), and the built-in ``cnn`` on digits images."""
    from fedbayes.curvature import fast_layers

    torch.manual_seed(0)
    tiny = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0), bias=False), torch.nn.Tanh(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5)).double()
    digits = _digits(6)[0].reshape(-1, 1, 8, 8).double()
    cnn = build_model("cnn", 64, 10, seed=0, input_shape=(1, 8, 8)).double()
    for model, x in ((tiny, torch.randn(7, 2, 9, 10, dtype=torch.float64)), (cnn, digits)):
        assert fast_layers(model) is not None
        own = dict(model.named_parameters())
        fast = diag_ggn(model, own, x, loss=loss, noise_var=0.7)
        ref = diag_ggn(model, {k: v.detach() for k, v in own.items()}, x, loss=loss, noise_var=0.7)
        for k in own:
            assert fast[k].shape == own[k].shape
            torch.testing.assert_close(fast[k], ref[k], rtol=1e-9, atol=1e-12)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, groups=2), torch.nn.Flatten())
    assert fast_layers(grouped) is None  # not covered by the fast path: the generic one serves it


def test_ivon_mode_learns_and_site_is_consistent() -> None:
    x, y = _digits(600)
    model = build_model("logreg", 64, 10, seed=0)
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    settings = LocalSettings(mode="ivon", lr=0.2, epochs=8, batch_size=32, hess_init=0.5, beta2=0.999, seed=3)
    res = train_local(model, prior, x, y, settings)
    acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.85
    assert res.site is not None and res.num_examples == 600
    post = prior.to(torch.float32) + res.site
    for k, m in post.mean().items():  # prior + site has the local mean exactly
        assert torch.allclose(m, res.mean[k], atol=1e-4)
    # same seed -> same result
    res2 = train_local(build_model("logreg", 64, 10, seed=0), prior, x, y, settings)
    assert all(torch.equal(res.mean[k], res2.mean[k]) for k in res.mean)


def test_fedavg_style_zero_prior_point_mode() -> None:
    x, y = _digits(200)
    model = build_model("logreg", 64, 10, seed=0)
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 0.0)  # the flat factor: s = 0
    res = train_local(model, prior, x, y, LocalSettings(mode="adam", lr=0.05, epochs=5, batch_size=20))
    assert res.site is None and res.metrics["steps"] == 50


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(temperature=math.nan), "temperature"),
        (dict(mode="rmsprop"), "mode"),
        (dict(epochs=0), "epochs"),
        (dict(beta2=1.0), "beta2"),
    ],
)
def test_bad_settings(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalSettings(**kw)


def test_bad_data_and_prior() -> None:
    model = build_model("logreg", 64, 10)
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    with pytest.raises(ValueError, match="empty"):
        train_local(model, prior, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), LocalSettings())
    bad = DiagGaussian.isotropic({"w": torch.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="names differ"):
        train_local(model, bad, torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), LocalSettings())
    nan_prior = prior.clone()
    nan_prior.prec["1.weight"][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"'1\.weight' prec has non-finite"):
        train_local(model, nan_prior, torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), LocalSettings())


def test_warm_start_curvature_is_exact() -> None:
    from fedbayes.local import initial_curvature

    s_pi = {"w": torch.tensor([1.0, 5.0, 0.5, -2.0], dtype=torch.float64)}
    start = {"w": torch.tensor([3.0, 2.0, 0.5, 1.0], dtype=torch.float64)}
    ess = 4.0
    (h,) = initial_curvature(s_pi, ess, 0.1, start, dtype=torch.float64)
    # h₀ = (S − s_π)/ess exactly — no hess-init floor, negative where the prior is stiffer than the start
    assert torch.equal(h, torch.tensor([0.5, -0.75, 0.0, 0.75], dtype=torch.float64))
    assert bool((ess * (h + s_pi["w"] / ess) > 0).all())  # the start posterior ess·(h₀ + δ) = S > 0
    (h1,) = initial_curvature(s_pi, ess, 0.1, None, dtype=torch.float64)  # no start precision: hess-init
    assert torch.allclose(h1, torch.tensor([0.1, 0.1, 0.1, 0.6], dtype=torch.float64))  # + max(0, −s_π/ess)
    with pytest.raises(ValueError, match="start precision of 'w' must be > 0"):
        initial_curvature(s_pi, ess, 0.1, {"w": torch.tensor([1.0, 0.0, 1.0, 1.0])})


@pytest.mark.parametrize("signed", [True, False])
def test_ivon_site_after_a_null_step_is_the_start_minus_the_prior(signed: bool) -> None:
    """IVON warm-started at S under a prior s_π and barely moved (tiny lr, β2 → 1) sends the site S − s_π:
    no made-up precision (the old hess-init floor added ess·0.1 to every coordinate), negative parts kept
    only for signed sites (bayes-admm) and clamped at 0 otherwise (PVI), the clamp counted."""
    x, y = _digits(64)
    model = build_model("mlp", 64, 10, seed=0, hidden=(8,), activation="sigmoid")
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    prior = DiagGaussian({k: torch.zeros_like(v) for k, v in named.items()},
                         {k: torch.rand(v.shape, generator=gen) * 4 + 1 for k, v in named.items()})
    start = {k: torch.rand(v.shape, generator=gen) * 4 + 1 for k, v in named.items()}
    settings = LocalSettings(mode="ivon", lr=1e-12, beta2=1 - 1e-12, epochs=1, batch_size=64, max_steps=1,
                             temperature=0.01, hess_init=0.1, signed_site=signed)
    res = train_local(model, prior, x, y, settings, start_mean={k: v.detach() for k, v in named.items()},
                      start_prec=start)
    assert res.site is not None
    n_neg = 0
    for k in named:
        want = (start[k] - prior.prec[k]).double()
        n_neg += int((want < 0).sum())
        got = res.site.prec[k].double()
        expect = want if signed else want.clamp_min(0.0)
        assert torch.allclose(got, expect, rtol=1e-4, atol=1e-3), k
    assert n_neg > 0
    assert res.metrics["site_clamped"] == (0 if signed else n_neg)


@pytest.mark.parametrize("temperature,ess_scale,per_example", [(1.0, 1.0, False), (0.25, 1.0, False),
                                                                (1.0, 0.5, False), (0.5, 4.0, True)])
def test_local_objective_scaling_has_its_closed_form(temperature: float, ess_scale: float,
                                                     per_example: bool) -> None:
    """Conjugate linear regression under a vector prior π = (η_π, s_π): with ess = N/(τ·ess_scale) the point
    solution solves (ess/N · XᵀX/σ² + S_π) θ = ess/N · Xᵀy/σ² + η_π, and the Laplace site is
    H = ess/N · XᵀX/σ² (diagonal design).  With ``prior_per_example`` the prior is multiplied by ess first
    (FedProx/FedADMM/FedDyn), i.e. (XᵀX/(Nσ²) + S_π) θ = Xᵀy/(Nσ²) + η_π."""
    rng = torch.Generator().manual_seed(1)
    d, noise_var = 3, 0.5
    w = torch.randn(d, generator=rng, dtype=torch.float64)
    x, y = _orthogonal_client(rng, d, 9, w, 0.4)
    n = x.shape[0]
    model = build_model("linreg", d, 1).double()
    tmpl = dict(model.named_parameters())
    s_pi = torch.tensor([0.7, 1.3, 2.0, 0.4], dtype=torch.float64)  # 3 weights, then the bias
    m_pi = torch.tensor([0.2, -0.5, 1.0, 0.1], dtype=torch.float64)
    prior = DiagGaussian({"1.weight": (s_pi[:3] * m_pi[:3]).reshape(1, 3), "1.bias": s_pi[3:] * m_pi[3:]},
                         {"1.weight": s_pi[:3].reshape(1, 3), "1.bias": s_pi[3:].clone()})
    assert set(tmpl) == set(prior.eta)
    settings = LocalSettings(mode="lbfgs", lr=1.0, epochs=3, loss="gaussian", noise_var=noise_var, laplace=True,
                             temperature=temperature, ess_scale=ess_scale, prior_per_example=per_example)
    res = train_local(model, prior, x, y, settings)
    ess = n / (temperature * ess_scale)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    data_prec = torch.diag(xa.T @ xa) / noise_var * (ess / n)
    data_eta = xa.T @ y / noise_var * (ess / n)
    scale = ess if per_example else 1.0
    theta = (data_eta + scale * s_pi * m_pi) / (data_prec + scale * s_pi)
    got = torch.cat([res.mean["1.weight"].reshape(-1), res.mean["1.bias"]])
    torch.testing.assert_close(got, theta, rtol=1e-7, atol=1e-9)
    assert res.site is not None
    site_prec = torch.cat([res.site.prec["1.weight"].reshape(-1), res.site.prec["1.bias"]])
    torch.testing.assert_close(site_prec, data_prec, rtol=1e-10, atol=1e-10)
