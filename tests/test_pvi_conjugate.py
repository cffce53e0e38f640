"""PVI with an exact local solver on a conjugate model reaches the centralized exact posterior.

Linear regression with a Gaussian likelihood (noise variance σ²) and prior N(0, δ⁻¹I).  Every client's
design has rows ±c·e_j, so XₖᵀXₖ is diagonal and Σᵢ xᵢ = 0 (the bias decouples): the exact posterior is
diagonal, and the exact likelihood factor of client k in natural parameters is

    Lₖ = (Xₐᵀy/σ², diag(XₐᵀXₐ)/σ²),      Xₐ = [X, 1],

computed here by hand.  The local solver is the real one (``train_local`` in L-BFGS mode with a Laplace site,
whose GGN is the exact Hessian here), so each client's new site is exactly Lₖ whatever cavity it gets.  Hence
PVI's damped sites are λ̃ₖ = (1 − (1 − ρ)^{nₖ}) Lₖ after nₖ updates and the global error is exactly
−Σₖ (1 − ρ)^{nₖ} Lₖ: one round at ρ = 1, geometric convergence at ρ < 1, the same fixed point under
partial participation.  The server arithmetic is float64; the wire is float32 (checked separately).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedbayes.algorithms import ClientUpdate
from fedbayes.algorithms.pvi import PVI
from fedbayes.gaussian import DiagGaussian
from fedbayes.local import LocalSettings, train_local
from fedbayes.models import build_model
from fedbayes.protocol import decode_reply, encode_task, execute

F64 = torch.float64
D, NOISE_VAR, DELTA = 3, 0.5, 2.0
SIZES = (4, 6, 3, 8, 5)  # pairs per client: Nₖ = 8, 12, 6, 16, 10
SETTINGS = LocalSettings(mode="lbfgs", lr=1.0, epochs=3, loss="gaussian", noise_var=NOISE_VAR, laplace=True)


def _orthogonal_client(rng: torch.Generator, n_pairs: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # rows ±c·e_j (as tests/test_local.py): XᵀX is diagonal and Σᵢ xᵢ = 0
    js = torch.randint(0, D, (n_pairs,), generator=rng)
    cs = torch.rand(n_pairs, generator=rng, dtype=F64) + 0.5
    x = torch.zeros(2 * n_pairs, D, dtype=F64)
    x[torch.arange(n_pairs), js] = cs
    x[torch.arange(n_pairs) + n_pairs, js] = -cs
    y = x @ w + 0.3 + 0.7 * torch.randn(2 * n_pairs, generator=rng, dtype=F64)
    return x, y


@pytest.fixture(scope="module")
def clients() -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=rng, dtype=F64)
    return [_orthogonal_client(rng, n, w) for n in SIZES]


def likelihood(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact Gaussian likelihood factor of (x, y) as a 2×(D+1) tensor [η; s] over (weights, bias)."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    gram = xa.T @ xa / NOISE_VAR
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros_like(gram), atol=1e-12)  # diagonal
    return torch.stack([xa.T @ y / NOISE_VAR, torch.diag(gram)])


LAM0 = torch.stack([torch.zeros(D + 1, dtype=F64), torch.full((D + 1,), DELTA, dtype=F64)])


def vec(g: DiagGaussian) -> torch.Tensor:
    return torch.stack([torch.cat([g.eta["1.weight"].reshape(-1), g.eta["1.bias"]]),
                        torch.cat([g.prec["1.weight"].reshape(-1), g.prec["1.bias"]])]).to(F64)


def mean_vec(rule: PVI) -> torch.Tensor:
    m = rule.global_mean()
    return torch.cat([m["1.weight"].reshape(-1), m["1.bias"]])


def model() -> torch.nn.Module:
    return build_model("linreg", D, 1, seed=3).double()


def new_rule(net: torch.nn.Module, rho: float) -> PVI:
    template = {k: v.detach() for k, v in net.named_parameters()}
    return PVI(template, len(SIZES), PVI.Config(prior_prec=DELTA, rho=rho))


def run_round(rule: PVI, net: torch.nn.Module, r: int, chosen: list[int], clients: list) -> None:  # type: ignore[type-arg]
    updates = []
    for c in chosen:
        task = rule.configure(c, r)
        x, y = clients[c]
        res = train_local(net, task.prior, x, y, SETTINGS, start_mean=task.start_mean, start_prec=task.start_prec)
        assert res.site is not None and res.site.dtype == F64
        updates.append(ClientUpdate(client=c, num_examples=len(x), site=res.site))
    rule.aggregate(r, updates)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_undamped_pvi_is_exact_in_one_round(clients) -> None:  # type: ignore[no-untyped-def]
    lik = [likelihood(x, y) for x, y in clients]
    exact = LAM0 + sum(lik)
    exact_mean = exact[0] / exact[1]
    net = model()
    rule = new_rule(net, rho=1.0)
    assert rel(vec(rule.global_posterior()), exact) > 0.1  # the prior is far from the posterior
    run_round(rule, net, 1, list(range(len(SIZES))), clients)
    got = vec(rule.global_posterior())
    assert rel(got[1], exact[1]) < 1e-12  # precisions: Hessians, no solver error
    assert rel(got[0], exact[0]) < 1e-8
    assert rel(mean_vec(rule), exact_mean) < 1e-8
    # ... and it is a fixed point: another round changes nothing (no double counting in the conjugate case)
    run_round(rule, net, 2, list(range(len(SIZES))), clients)
    assert rel(vec(rule.global_posterior()), exact) < 1e-8


def test_damped_pvi_converges_geometrically(clients) -> None:  # type: ignore[no-untyped-def]
    rho = 0.5
    lik = [likelihood(x, y) for x, y in clients]
    exact = LAM0 + sum(lik)
    net = model()
    rule = new_rule(net, rho=rho)
    err0 = (vec(rule.global_posterior()) - exact).abs().max()
    mean_errs = []
    for r in range(1, 9):
        run_round(rule, net, r, list(range(len(SIZES))), clients)
        got = vec(rule.global_posterior())
        # λ_r − λ* = −(1 − ρ)^r Σₖ Lₖ exactly (the solver's 1e-10 aside)
        atol = 1e-8 * float(exact.abs().max())
        torch.testing.assert_close(got - exact, -((1 - rho) ** r) * sum(lik), rtol=0, atol=atol)
        assert float((got - exact).abs().max() / err0) == pytest.approx((1 - rho) ** r, rel=1e-6)
        mean_errs.append(rel(mean_vec(rule), exact[0] / exact[1]))
    assert all(b < a for a, b in itertools.pairwise(mean_errs))  # the mean error shrinks too
    assert mean_errs[-1] < 0.01


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_partial_participation_reaches_the_same_fixed_point(clients, rho: float) -> None:  # type: ignore[no-untyped-def]
    lik = [likelihood(x, y) for x, y in clients]
    exact = LAM0 + sum(lik)
    net = model()
    rule = new_rule(net, rho=rho)
    rng = np.random.default_rng(1234)
    counts = [0] * len(SIZES)
    target = 1 if rho == 1.0 else 20  # 0.5^20 ≈ 1e-6
    r = 0
    while min(counts) < target:
        r += 1
        assert r < 200
        chosen = sorted(int(c) for c in rng.choice(len(SIZES), size=2, replace=False))
        run_round(rule, net, r, chosen, clients)
        for c in chosen:
            counts[c] += 1
        # every round: λ − λ* = −Σₖ (1 − ρ)^{nₖ} Lₖ, absent clients' sites stale, the global over all K
        predicted = exact - sum((1 - rho) ** n * lk for n, lk in zip(counts, lik, strict=True))
        torch.testing.assert_close(vec(rule.global_posterior()), predicted, rtol=0,
                                   atol=1e-8 * float(exact.abs().max()))
    assert r > 1  # it really was partial
    assert rel(vec(rule.global_posterior()), exact) < 1e-5
    assert rel(mean_vec(rule), exact[0] / exact[1]) < 1e-5


def test_wire_round_agrees_to_float32_precision(clients) -> None:  # type: ignore[no-untyped-def]
    """Two damped rounds through encode_task → execute → decode_reply (float32 messages) against the float64
    path: the same global up to float32 rounding."""
    rho = 0.5
    net = model()
    direct, wire = new_rule(net, rho), new_rule(net, rho)
    shapes = {k: tuple(v.shape) for k, v in net.named_parameters()}
    cfg = {**SETTINGS.to_wire(), "reply": "site"}
    for r in (1, 2):
        run_round(direct, net, r, list(range(len(SIZES))), clients)
        updates = []
        for c, (x, y) in enumerate(clients):
            msg = encode_task(wire.configure(c, r))
            assert all(a.dtype == np.float32 for rec in msg.values() for a in rec.values())
            reply, metrics = execute(net, msg, cfg, x, y)
            assert set(reply) == {"site.eta", "site.prec"}
            assert all(a.dtype == np.float32 for rec in reply.values() for a in rec.values())
            updates.append(decode_reply(reply, metrics, client=c, shapes=shapes, need_site=True,
                                        expected_examples=len(x)))
        wire.aggregate(r, updates)
        a, b = vec(wire.global_posterior()), vec(direct.global_posterior())
        assert rel(a, b) < 1e-6  # float32 has 24 bits: ~6e-8 per number, a few roundings summed
        ma, mb = wire.global_mean(), direct.global_mean()
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=1e-6, atol=1e-7)
