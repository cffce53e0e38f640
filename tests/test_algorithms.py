"""Every server rule on a toy federation, against numbers derived by hand (no training).

The model has three scalars in two named parameters (``w`` of shape (2,), ``b`` of shape (1,)); there are
K = 3 clients and two or three rounds with partial participation (round 1: clients {0, 1}; then {1, 2}, or
{1} and {2} where a never-seen client's initial state matters), so absent clients are stale or never seen.
The expected values are written out as explicit arithmetic on small tensors, following the equations of
DESIGN §2 and ``reference/algorithms-papers.md`` — never by calling the rule under test.  A Gaussian is
written there as a 2×3 tensor: row 0 is η, row 1 is the precision s (natural parameters add).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedbayes.algorithms import (
    REGISTRY,
    Algorithm,
    ClientUpdate,
    DiskStore,
    algorithm_names,
    get_algorithm,
)
from fedbayes.algorithms.bayes_admm import BayesADMM, BayesADMMConfig
from fedbayes.algorithms.fedadmm import FedADMM, FedADMMConfig
from fedbayes.algorithms.fedavg import FedAvg
from fedbayes.algorithms.feddyn import FedDyn, FedDynConfig
from fedbayes.algorithms.fedlap import FedLap, FedLapConfig
from fedbayes.algorithms.fedlap_cov import FedLapCov
from fedbayes.algorithms.fedprox import FedProx, FedProxConfig
from fedbayes.algorithms.pvi import PVI
from fedbayes.algorithms.sites import SiteConfig
from fedbayes.gaussian import DiagGaussian

F64 = torch.float64
K = 3
INIT = (0.5, -1.0, 2.0)  # the model's initial weights: w = (0.5, -1), b = (2,)


# ------------------------------------------------------------------------------------------------ helpers
def t(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=F64)


def nat(eta: tuple[float, ...], prec: tuple[float, ...]) -> torch.Tensor:
    """A Gaussian as a 2×3 tensor [η; s]."""
    return torch.stack([t(*eta), t(*prec)])


def params(v: torch.Tensor | tuple[float, ...]) -> dict[str, torch.Tensor]:
    v = v if isinstance(v, torch.Tensor) else t(*v)
    return {"w": v[:2].clone(), "b": v[2:].clone()}


def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    assert list(p) == ["w", "b"]
    return torch.cat([p["w"].reshape(-1), p["b"].reshape(-1)]).to(F64)


def gauss(g: torch.Tensor) -> DiagGaussian:
    return DiagGaussian(params(g[0]), params(g[1]))


def as_nat(g: DiagGaussian | None) -> torch.Tensor:
    assert g is not None
    return torch.stack([flat(g.eta), flat(g.prec)])


def mean_update(client: int, n: int, mean: tuple[float, ...]) -> ClientUpdate:
    return ClientUpdate(client=client, num_examples=n, mean=params(mean))


def site_update(client: int, n: int, site: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(client=client, num_examples=n, site=gauss(site))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def make(cls: type[Algorithm], init: tuple[float, ...] = INIT, **cfg: Any) -> Algorithm:
    return cls(params(init), K, cls.Config(**cfg))


LAM0 = nat((0.0, 0.0, 0.0), (2.0, 2.0, 2.0))  # λ₀ = N(0, 1/δ) with δ = 2


# ------------------------------------------------------------------------------------------------ point rules
def test_fedavg_weighted_by_num_examples_partial_rounds() -> None:
    rule = make(FedAvg)
    task = rule.configure(0, 1)
    close(as_nat(task.prior), torch.zeros(2, 3, dtype=F64))  # s_π = 0: plain local training
    assert task.start_mean is not None
    close(flat(task.start_mean), t(*INIT))
    # round 1: client 0 (N=1) and client 1 (N=3); client 2 absent
    rule.aggregate(1, [mean_update(0, 1, (1.0, 2.0, 3.0)), mean_update(1, 3, (5.0, 6.0, -1.0))])
    m1 = (1 * t(1.0, 2.0, 3.0) + 3 * t(5.0, 6.0, -1.0)) / (1 + 3)  # = (4, 5, 0)
    close(flat(rule.global_mean()), m1)
    assert rule.configure(2, 2).start_mean is not None
    close(flat(rule.configure(2, 2).start_mean), m1)  # type: ignore[arg-type]
    # round 2: client 1 (N=3) and client 2 (N=1): the global is the mean over S only
    rule.aggregate(2, [mean_update(1, 3, (0.0, 0.0, 1.0)), mean_update(2, 1, (4.0, 8.0, 5.0))])
    m2 = (3 * t(0.0, 0.0, 1.0) + 1 * t(4.0, 8.0, 5.0)) / (3 + 1)  # = (1, 2, 2)
    close(flat(rule.global_mean()), m2)


def test_fedprox_prior_is_per_example_proximal_term() -> None:
    mu = 0.5
    rule = make(FedProx, mu=mu)
    assert isinstance(rule.config, FedProxConfig)
    task = rule.configure(1, 1)
    close(as_nat(task.prior), torch.stack([mu * t(*INIT), t(mu, mu, mu)]))  # η = μ m_g, s = μ
    assert task.overrides.get("prior_per_example") is True
    close(flat(task.start_mean), t(*INIT))  # type: ignore[arg-type]
    rule.aggregate(1, [mean_update(0, 1, (1.0, 2.0, 3.0)), mean_update(1, 3, (5.0, 6.0, -1.0))])
    m1 = (1 * t(1.0, 2.0, 3.0) + 3 * t(5.0, 6.0, -1.0)) / 4
    close(flat(rule.global_mean()), m1)
    task = rule.configure(2, 2)
    close(as_nat(task.prior), torch.stack([mu * m1, t(mu, mu, mu)]))
    close(flat(task.prior.mean()), m1)  # the prior is centred on the global mean
    rule.aggregate(2, [mean_update(1, 3, (0.0, 0.0, 1.0)), mean_update(2, 1, (4.0, 8.0, 5.0))])
    close(flat(rule.global_mean()), (3 * t(0.0, 0.0, 1.0) + t(4.0, 8.0, 5.0)) / 4)


def test_fedadmm_duals_and_consensus_over_all_clients() -> None:
    rho = 0.5
    rule = make(FedADMM, rho=rho)
    assert isinstance(rule.config, FedADMMConfig)
    m0 = t(*INIT)
    for c in range(K):  # round 1: duals 0, prior N(m_g, 1/ρ) per example
        task = rule.configure(c, 1)
        close(as_nat(task.prior), torch.stack([rho * m0, t(rho, rho, rho)]))
        assert task.overrides.get("prior_per_example") is True
        close(flat(task.start_mean), m0)  # type: ignore[arg-type]
    ma, mb = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [mean_update(0, 10, tuple(ma.tolist())), mean_update(1, 30, tuple(mb.tolist()))])
    # z-update over all K with the old duals (0); never-seen client 2 counts with the initial mean
    g1 = (ma + mb + m0) / 3
    close(flat(rule.global_mean()), g1)
    y0, y1, y2 = rho * (ma - g1), rho * (mb - g1), torch.zeros(3, dtype=F64)
    for c, y in ((0, y0), (1, y1), (2, y2)):
        task = rule.configure(c, 2)
        close(as_nat(task.prior), torch.stack([rho * g1 - y, t(rho, rho, rho)]))
        close(flat(task.prior.mean()), g1 - y / rho)  # centre m_g − yₖ/ρ
        close(flat(task.start_mean), g1)  # type: ignore[arg-type]
    # round 2: only client 1; client 0 is stale and client 2, never seen, still counts with the initial mean
    mc = t(0.0, 0.0, 1.0)
    rule.aggregate(2, [mean_update(1, 30, tuple(mc.tolist()))])
    g2 = ((ma + y0 / rho) + (mc + y1 / rho) + (m0 + y2 / rho)) / 3  # fresh mean, old dual for client 1
    close(flat(rule.global_mean()), g2)
    y1 = y1 + rho * (mc - g2)
    # round 3: only client 2
    md = t(4.0, 8.0, 5.0)
    rule.aggregate(3, [mean_update(2, 20, tuple(md.tolist()))])
    g3 = ((ma + y0 / rho) + (mc + y1 / rho) + (md + y2 / rho)) / 3
    close(flat(rule.global_mean()), g3)
    y2 = y2 + rho * (md - g3)
    for c, y in ((0, y0), (1, y1), (2, y2)):
        close(as_nat(rule.configure(c, 4).prior), torch.stack([rho * g3 - y, t(rho, rho, rho)]))


def test_feddyn_server_state_h_and_client_gradients() -> None:
    a, wd = 0.5, 0.25
    rule = make(FedDyn, alpha=a, weight_decay=wd)
    assert isinstance(rule.config, FedDynConfig)
    m0 = t(*INIT)
    s = t(a + wd, a + wd, a + wd)
    for c in range(K):
        task = rule.configure(c, 1)
        close(as_nat(task.prior), torch.stack([a * m0, s]))  # η = α m_g + gₖ with gₖ = 0
        assert task.overrides.get("prior_per_example") is True
    ma, mb = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [mean_update(0, 10, tuple(ma.tolist())), mean_update(1, 30, tuple(mb.tolist()))])
    g0, g1, g2 = -a * (ma - m0), -a * (mb - m0), torch.zeros(3, dtype=F64)
    h = -(a / K) * ((ma - m0) + (mb - m0))
    mg1 = (ma + mb) / 2 - h / a
    close(flat(rule.global_mean()), mg1)
    for c, g in ((0, g0), (1, g1), (2, g2)):
        task = rule.configure(c, 2)
        close(as_nat(task.prior), torch.stack([a * mg1 + g, s]))
        close(flat(task.start_mean), mg1)  # type: ignore[arg-type]
    mc, md = t(0.0, 0.0, 1.0), t(4.0, 8.0, 5.0)
    rule.aggregate(2, [mean_update(1, 30, tuple(mc.tolist())), mean_update(2, 20, tuple(md.tolist()))])
    g1 = g1 - a * (mc - mg1)
    g2 = g2 - a * (md - mg1)
    h = h - (a / K) * ((mc - mg1) + (md - mg1))
    mg2 = (mc + md) / 2 - h / a  # the average over the clients that replied, corrected by h
    close(flat(rule.global_mean()), mg2)
    close(flat(rule.state.h), h)
    for c, g in ((0, g0), (1, g1), (2, g2)):  # client 0 keeps its stale g₀
        close(as_nat(rule.configure(c, 3).prior), torch.stack([a * mg2 + g, s]))


def test_fedlap_global_is_sum_of_duals() -> None:
    d, rho = 2.0, 0.5
    rule = make(FedLap, prior_prec=d, rho=rho)
    assert isinstance(rule.config, FedLapConfig)
    zero = torch.zeros(3, dtype=F64)
    close(flat(rule.global_mean()), zero)  # w_g = 0 as in the reference
    task = rule.configure(0, 1)
    close(as_nat(task.prior), torch.stack([zero, t(d, d, d)]))  # N(0, 1/δ), absolute units
    assert not task.overrides.get("prior_per_example", False)
    close(flat(task.start_mean), t(*INIT))  # type: ignore[arg-type]  # round 1 starts at the init weights
    ma, mb = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [mean_update(0, 10, tuple(ma.tolist())), mean_update(1, 30, tuple(mb.tolist()))])
    v0, v1, v2 = rho * (ma - zero), rho * (mb - zero), zero
    mg1 = v0 + v1 + v2  # Σ over all K, no 1/K
    close(flat(rule.global_mean()), mg1)
    for c, v in ((0, v0), (1, v1), (2, v2)):
        task = rule.configure(c, 2)
        close(as_nat(task.prior), torch.stack([d * (mg1 - v), t(d, d, d)]))  # N(m_g − vₖ, 1/δ)
        close(flat(task.start_mean), mg1)  # type: ignore[arg-type]
    mc, md = t(0.0, 0.0, 1.0), t(4.0, 8.0, 5.0)
    rule.aggregate(2, [mean_update(1, 30, tuple(mc.tolist())), mean_update(2, 20, tuple(md.tolist()))])
    v1 = v1 + rho * (mc - mg1)
    v2 = v2 + rho * (md - mg1)
    mg2 = v0 + v1 + v2  # stale v₀ still counts
    close(flat(rule.global_mean()), mg2)
    close(as_nat(rule.configure(0, 3).prior), torch.stack([d * (mg2 - v0), t(d, d, d)]))


# ------------------------------------------------------------------------------------------------ Bayesian rules
TA = nat((1.0, -2.0, 0.5), (4.0, 1.0, 2.0))
TB = nat((-3.0, 1.0, 2.5), (2.0, 3.0, 0.5))
TC = nat((0.25, 4.0, -1.0), (1.0, 5.0, 1.5))
TD = nat((2.0, -0.5, 3.0), (3.0, 0.5, 4.0))


@pytest.mark.parametrize("cls", [FedLapCov, PVI])
def test_site_rules_damped_sites_cavities_and_global(cls: type[Algorithm]) -> None:
    d, rho = 2.0, 0.5
    rule = make(cls, prior_prec=d, rho=rho)
    assert isinstance(rule.config, SiteConfig) and rule.needs_site()
    warm = cls is PVI  # PVI warm-starts IVON at the global precision; FedLap-Cov (point mode) does not
    close(as_nat(rule.global_posterior()), LAM0)
    for c in range(K):
        task = rule.configure(c, 1)
        close(as_nat(task.prior), LAM0)  # cavity = λ₀ while all sites are 0
        close(flat(task.start_mean), t(*INIT))  # type: ignore[arg-type]
        assert task.start_prec is None  # round 1: the global is only λ₀, IVON starts from hess-init
    rule.aggregate(1, [site_update(0, 10, TA), site_update(1, 30, TB)])
    s0, s1, s2 = (1 - rho) * 0 + rho * TA, (1 - rho) * 0 + rho * TB, torch.zeros(2, 3, dtype=F64)
    glob = LAM0 + s0 + s1 + s2
    close(as_nat(rule.global_posterior()), glob)
    close(flat(rule.global_mean()), glob[0] / glob[1])
    for c, s in ((0, s0), (1, s1), (2, s2)):
        task = rule.configure(c, 2)
        close(as_nat(task.prior), glob - s)  # cavity = global − own site
        close(flat(task.start_mean), glob[0] / glob[1])  # type: ignore[arg-type]
        if warm:
            close(flat(task.start_prec), glob[1])  # type: ignore[arg-type]
    rule.aggregate(2, [site_update(1, 30, TC), site_update(2, 20, TD)])
    s1 = (1 - rho) * s1 + rho * TC
    s2 = (1 - rho) * s2 + rho * TD
    glob = LAM0 + s0 + s1 + s2  # stale s₀ still counts
    close(as_nat(rule.global_posterior()), glob)
    for c, s in ((0, s0), (1, s1), (2, s2)):
        close(as_nat(rule.configure(c, 3).prior), glob - s)


@pytest.mark.parametrize("server_step", [None, 0.25])
def test_bayes_admm_duals_and_server_step(server_step: float | None) -> None:
    d, rho, gamma = 2.0, 0.5, 0.5
    # the mean over the clients heard from (server-mean = heard; the participants' mean: tests/test_exclusion.py)
    rule = make(BayesADMM, prior_prec=d, rho=rho, damping=gamma, server_step=server_step, safe_prior=False,
                server_mean="heard")
    assert isinstance(rule, BayesADMM) and isinstance(rule.config, BayesADMMConfig) and rule.needs_site()
    alpha = 1 / (1 + rho * K) if server_step is None else server_step  # default α = 1/(1 + ρK) = 0.4
    assert rule.alpha == pytest.approx(alpha, rel=1e-15)
    for c in range(K):
        task = rule.configure(c, 1)
        close(as_nat(task.prior), LAM0)  # πₖ = λ̄ − λ̂ₖ/ρ with λ̄ = λ₀, λ̂ₖ = 0
        close(flat(task.start_mean), t(*INIT))  # type: ignore[arg-type]
        assert task.start_prec is None  # round 1: the global is only λ₀, IVON starts from hess-init
        assert task.overrides == {"ess_scale": rho, "signed_site": True}  # ess = Nₖ/(τρ), s̃ = ess·h unclamped
    bar0 = LAM0
    rule.aggregate(1, [site_update(0, 10, TA), site_update(1, 30, TB)])
    lam0_, lam1_ = (bar0 - 0 / rho) + TA, (bar0 - 0 / rho) + TB  # λₖ = πₖ + site
    dual0 = 0 + gamma * rho * (lam0_ - bar0)
    dual1 = 0 + gamma * rho * (lam1_ - bar0)
    dual2 = torch.zeros(2, 3, dtype=F64)
    # never-seen client 2 is left out of the mean (the clients heard from), with a zero dual in the sum
    bar1 = (1 - alpha) * (lam0_ + lam1_) / 2 + alpha * (LAM0 + dual0 + dual1 + dual2)
    assert bool((bar1[1] > 0).all())  # (so the min-prec floor plays no role)
    close(as_nat(rule.global_posterior()), bar1)
    close(flat(rule.global_mean()), bar1[0] / bar1[1])
    for c, dual in ((0, dual0), (1, dual1), (2, dual2)):
        task = rule.configure(c, 2)
        close(as_nat(task.prior), bar1 - dual / rho)
        close(flat(task.start_mean), bar1[0] / bar1[1])  # type: ignore[arg-type]
        close(flat(task.start_prec), bar1[1])  # type: ignore[arg-type]
    # round 2: only client 1 (client 2 is still never-seen: out of the mean; client 0 stale, at its last λ₀)
    rule.aggregate(2, [site_update(1, 30, TC)])
    lam1_ = (bar1 - dual1 / rho) + TC
    dual1 = dual1 + gamma * rho * (lam1_ - bar1)
    bar2 = (1 - alpha) * (lam0_ + lam1_) / 2 + alpha * (LAM0 + dual0 + dual1 + dual2)
    assert bool((bar2[1] > 0).all())
    close(as_nat(rule.global_posterior()), bar2)
    # round 3: only client 2
    rule.aggregate(3, [site_update(2, 20, TD)])
    lam2_ = (bar2 - dual2 / rho) + TD
    dual2 = dual2 + gamma * rho * (lam2_ - bar2)
    bar3 = (1 - alpha) * (lam0_ + lam1_ + lam2_) / 3 + alpha * (LAM0 + dual0 + dual1 + dual2)
    assert bool((bar3[1] > 0).all())
    close(as_nat(rule.global_posterior()), bar3)
    for c, dual in ((0, dual0), (1, dual1), (2, dual2)):
        close(as_nat(rule.configure(c, 4).prior), bar3 - dual / rho)


def _dyadic_site(gen: torch.Generator) -> torch.Tensor:
    # multiples of 1/8: every sum/difference below is exact in float64, so "equal" means bit-equal
    eta = torch.randint(-40, 41, (3,), generator=gen).to(F64) / 8
    prec = torch.randint(1, 41, (3,), generator=gen).to(F64) / 8
    return torch.stack([eta, prec])


def _generic_site(gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randn(3, generator=gen, dtype=F64), torch.rand(3, generator=gen, dtype=F64) + 0.1])


@pytest.mark.parametrize("kind", ["dyadic", "generic"])
def test_bayes_admm_with_unit_steps_is_pvi(kind: str) -> None:
    """α = ρ = γ = 1: λ̂ₖ ← λ̂ₖ + (πₖ + site − λ̄) = site and λ̄ = λ₀ + Σλ̂ₖ — undamped PVI."""
    gen = torch.Generator().manual_seed(7)
    draw = _dyadic_site if kind == "dyadic" else _generic_site
    admm = make(BayesADMM, prior_prec=2.0, rho=1.0, damping=1.0, server_step=1.0, safe_prior=False)
    pvi = make(PVI, prior_prec=2.0, rho=1.0)
    schedule = [[0, 1], [1, 2], [0, 2], [0, 1, 2], [2]]
    for r, chosen in enumerate(schedule, start=1):
        for c in range(K):
            pa, pp = as_nat(admm.configure(c, r).prior), as_nat(pvi.configure(c, r).prior)
            if kind == "dyadic":
                assert torch.equal(pa, pp), (r, c)
            else:
                close(pa, pp)
        sites = {c: draw(gen) for c in chosen}
        admm.aggregate(r, [site_update(c, 5 + c, s) for c, s in sites.items()])
        pvi.aggregate(r, [site_update(c, 5 + c, s) for c, s in sites.items()])
        ga, gp = as_nat(admm.global_posterior()), as_nat(pvi.global_posterior())
        if kind == "dyadic":
            assert torch.equal(ga, gp), r
            assert torch.equal(flat(admm.global_mean()), flat(pvi.global_mean()))
        else:
            close(ga, gp)


# ------------------------------------------------------------------------------------------------ all rules
HYPER: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.5},
    "fedadmm": {"rho": 0.5},
    "feddyn": {"alpha": 0.5, "weight_decay": 0.25},
    "fedlap": {"prior_prec": 2.0, "rho": 0.5},
    "fedlap-cov": {"prior_prec": 2.0, "rho": 0.5},
    "pvi": {"prior_prec": 2.0, "rho": 0.5},
    "bayes-admm": {"prior_prec": 2.0, "rho": 0.5, "damping": 0.5, "safe_prior": False},
}


def test_every_registered_rule_is_covered() -> None:
    assert set(HYPER) == set(algorithm_names()) == set(REGISTRY)
    for name in algorithm_names():
        assert get_algorithm(name).name == name


def _updates(rule: Algorithm, server_round: int, clients: list[int]) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(100 * server_round)
    out = []
    for c in clients:
        if rule.needs_site():
            out.append(site_update(c, 7 + c, _generic_site(gen)))
        else:
            mean = params(torch.randn(3, generator=gen, dtype=F64))
            out.append(ClientUpdate(client=c, num_examples=7 + c, mean=mean))
    return out


def _state(rule: Algorithm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rule.state_tensors().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _same_task(rule_a: Algorithm, rule_b: Algorithm, server_round: int) -> None:
    for c in range(K):
        ta, tb = rule_a.configure(c, server_round), rule_b.configure(c, server_round)
        assert torch.equal(as_nat(ta.prior), as_nat(tb.prior)), c
        for x, y in ((ta.start_mean, tb.start_mean), (ta.start_prec, tb.start_prec)):
            assert (x is None) == (y is None)
            if x is not None and y is not None:
                assert torch.equal(flat(x), flat(y))
        assert ta.overrides == tb.overrides


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("name", sorted(HYPER))
def test_state_round_trip_reproduces_next_round(name: str, store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cls = get_algorithm(name)
    a = make(cls, **HYPER[name])
    a.aggregate(1, _updates(a, 1, [0, 1]))
    blob = st_save({k: v.contiguous() for k, v in a.state_tensors().items()})  # what a checkpoint holds
    # a fresh rule built from *different* initial weights: everything it needs must come from the checkpoint
    b = cls(params((9.0, 9.0, 9.0)), K, cls.Config(**HYPER[name]),
            store=DiskStore(tmp_path / "b") if store == "disk" else None)
    b.load_state_tensors(st_load(blob))
    _same_state(_state(a), _state(b))
    _same_task(a, b, 2)
    for r, chosen in ((2, [1, 2]), (3, [0, 2])):
        a.aggregate(r, _updates(a, r, chosen))
        b.aggregate(r, _updates(b, r, chosen))
        assert torch.equal(flat(a.global_mean()), flat(b.global_mean()))
        _same_state(_state(a), _state(b))
        _same_task(a, b, r + 1)


def test_load_state_rejects_a_checkpoint_without_server_tensors() -> None:
    rule = make(FedDyn)
    with pytest.raises(ValueError, match="lacks server tensors"):
        rule.load_state_tensors({})


@pytest.mark.parametrize("name", sorted(HYPER))
def test_empty_round_leaves_the_global_unchanged(name: str) -> None:
    rule = make(get_algorithm(name), **HYPER[name])
    rule.aggregate(1, _updates(rule, 1, [0, 2]))
    before = flat(rule.global_mean())
    rule.aggregate(2, [])  # every chosen client failed
    close(flat(rule.global_mean()), before)


@pytest.mark.parametrize("name", sorted(HYPER))
def test_bad_input_raises_before_touching_state(name: str) -> None:
    rule = make(get_algorithm(name), **HYPER[name])
    rule.aggregate(1, _updates(rule, 1, [0, 1]))
    before = _state(rule)
    good = _updates(rule, 2, [1])[0]

    def bad(**kw: object) -> ClientUpdate:
        u = ClientUpdate(client=2, num_examples=5, mean=good.mean, site=good.site)
        for k, v in kw.items():
            setattr(u, k, v)
        return u

    cases = [bad(client=K), bad(client=-1), bad(num_examples=0), bad(client=1)]  # the last: client 1 twice
    if rule.needs_site():
        cases.append(bad(site=None, mean=params(INIT)))  # a Bayesian rule receiving no site
        cases.append(bad(site=DiagGaussian({"w": torch.ones(3, dtype=F64)}, {"w": torch.ones(3, dtype=F64)})))
    else:
        cases.append(bad(mean=None, site=gauss(TA)))  # a point rule receiving no mean
        cases.append(bad(mean={"w": torch.ones(2, dtype=F64), "b": torch.ones(2, dtype=F64)}))  # wrong shape
    for u in cases:
        with pytest.raises(ValueError):
            rule.aggregate(2, [good, u])  # the good reply first: nothing may be stored before the check
        _same_state(before, _state(rule))


def test_registry_and_constructor_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm("fedsgd")
    with pytest.raises(ValueError, match="num_clients"):
        FedAvg(params(INIT), 0)
    with pytest.raises(TypeError):
        FedLap(params(INIT), K, FedProxConfig(mu=0.1))


def test_configure_is_pure() -> None:
    """Asking for a task (several times, for any client) must not change the state."""
    for name, cls in REGISTRY.items():
        rule = make(cls, **HYPER[name])
        rule.aggregate(1, _updates(rule, 1, [0, 1]))
        before = _state(rule)
        for c, r in itertools.product(range(K), (2, 2)):
            rule.configure(c, r)
        _same_state(before, _state(rule))


def test_bayes_admm_safe_prior_floors_the_sent_precision() -> None:
    # one scalar parameter, K = 2, δ = 1, ρ = 1, γ = 1, α = 1/3. Round 1: both clients get λ₀ = (0, 1).
    import torch as _t

    from fedbayes.algorithms.base import ClientUpdate as _U
    from fedbayes.gaussian import DiagGaussian as _G

    tmpl = {"w": _t.zeros(1)}
    rule = BayesADMM(tmpl, 2, BayesADMMConfig(prior_prec=1.0, rho=1.0, damping=1.0))
    site = lambda e, s: _G({"w": _t.tensor([e], dtype=_t.float64)}, {"w": _t.tensor([s], dtype=_t.float64)})  # noqa: E731
    # client 0 reports a large site (precision 20), client 1 a flat one
    rule.aggregate(1, [_U(client=0, num_examples=5, site=site(40.0, 20.0)), _U(client=1, num_examples=5,
                                                                             site=site(0.0, 0.0))])
    # λ₀ = (0, 1); λ_0 = (40, 21), λ_1 = (0, 1); duals λ̂_0 = λ_0 − λ₀ = (40, 20), λ̂_1 = (0, 0)
    # λ̄ = (2/3)·mean(λ_k) + (1/3)(λ₀ + Σλ̂) = (2/3)(20, 11) + (1/3)(40, 21) = (80/3, 43/3)
    glob = rule.global_posterior()
    assert float(glob.prec["w"]) == pytest.approx(43 / 3) and float(glob.eta["w"]) == pytest.approx(80 / 3)
    # client 0's paper prior λ̄ − λ̂_0 has precision 43/3 − 20 < 0 → sent as N(m̄, 1/δ) with m̄ = 80/43
    p0 = rule.configure(0, 2).prior
    assert float(p0.prec["w"]) == pytest.approx(1.0) and float(p0.eta["w"]) == pytest.approx(80 / 43)
    # client 1's prior is untouched (precision 43/3 ≥ δ)
    p1 = rule.configure(1, 2).prior
    assert float(p1.prec["w"]) == pytest.approx(43 / 3)
    unsafe = BayesADMM(tmpl, 2, BayesADMMConfig(prior_prec=1.0, rho=1.0, damping=1.0, safe_prior=False))
    unsafe.load_state_tensors(rule.state_tensors())
    assert float(unsafe.configure(0, 2).prior.prec["w"]) == pytest.approx(43 / 3 - 20)


# --- running sums: a round costs O(participants); the sums stay exact -------------------------------------------
@pytest.mark.parametrize("cls", [PVI, BayesADMM])
def test_running_sums_match_a_full_recomputation_after_many_partial_rounds(cls: type[Algorithm],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fedbayes.algorithms.base as base

    monkeypatch.setattr(base, "RECOMPUTE_EVERY", 10**9)  # never recompute: measure the running sums' drift
    gen = torch.Generator().manual_seed(3)
    tmpl = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
    cfg = BayesADMMConfig(rho=0.3, damping=0.2) if cls is BayesADMM else cls.Config(prior_prec=1.0, rho=0.5)
    rule = cls(tmpl, 40, cfg, active=[c for c in range(40) if c != 7])
    for r in range(1, 501):
        chosen = sorted(int(c) for c in torch.randperm(40, generator=gen)[:5] if int(c) != 7)
        updates = []
        for c in chosen:
            prec = {k: torch.rand(v.shape, generator=gen, dtype=torch.float64) * 50 + 1 for k, v in tmpl.items()}
            eta = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * 10 for k, v in tmpl.items()}
            updates.append(ClientUpdate(c, 10, site=DiagGaussian(eta, prec)))
        rule.aggregate(r, updates)
    if cls is BayesADMM:
        assert isinstance(rule, BayesADMM)
        want = rule.recomputed_sums()
        got = (rule.state.post_sum, rule.state.dual_sum)
    else:
        assert isinstance(rule, PVI)
        want, got = (rule.recomputed_sum(),), (rule.state.site_sum,)
    for w, g in zip(want, got, strict=True):
        assert g is not None
        for k in tmpl:
            for a, b in ((g.eta[k], w.eta[k]), (g.prec[k], w.prec[k])):
                assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max()), k


@pytest.mark.parametrize("cls", [FedADMM, FedLap])
def test_mean_rules_running_sums_follow_their_o_k_definition(cls: type[Algorithm],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """FedADMM's m_g = (1/K)Σₖ(mₖ + yₖ/ρ) and FedLap's m_g = Σₖ vₖ over all K clients, re-derived every round from
    a hand-kept copy of every client's state, match the rules' running sums (never recomputed) to 1e-12."""
    import fedbayes.algorithms.base as base

    monkeypatch.setattr(base, "RECOMPUTE_EVERY", 10**9)
    gen = torch.Generator().manual_seed(5)
    tmpl = {"w": torch.zeros(5, 3), "b": torch.zeros(3)}
    K, rho = 30, 0.2
    cfg = FedADMMConfig(rho=rho) if cls is FedADMM else FedLapConfig(rho=rho)
    rule = cls(tmpl, K, cfg, active=[c for c in range(K) if c != 4])
    active = [c for c in range(K) if c != 4]
    init = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in tmpl.items()}
    rule.state = rule.init_state(init)
    zero = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in tmpl.items()}
    m = {c: dict(init) for c in active}  # FedADMM: mₖ (never heard from: the round-0 mean)
    y = {c: dict(zero) for c in active}  # FedADMM yₖ, FedLap vₖ
    for r in range(1, 301):
        chosen = sorted(int(c) for c in torch.randperm(K, generator=gen)[:4] if int(c) != 4)
        fresh = {c: {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * 3 for k, v in tmpl.items()}
                 for c in chosen}
        m_g = rule.global_mean()
        rule.aggregate(r, [ClientUpdate(c, 10, mean={k: v.float() for k, v in fresh[c].items()}) for c in chosen])
        fresh = {c: {k: v.float().double() for k, v in f.items()} for c, f in fresh.items()}  # as sent (float32)
        if cls is FedADMM:
            m.update(fresh)
            want = {k: sum(m[c][k] + y[c][k] / rho for c in active) / len(active) for k in tmpl}
            for c in chosen:
                y[c] = {k: y[c][k] + rho * (m[c][k] - want[k]) for k in tmpl}
        else:
            for c in chosen:
                y[c] = {k: y[c][k] + rho * (fresh[c][k] - m_g[k]) for k in tmpl}
            want = {k: sum(y[c][k] for c in active) for k in tmpl}
        got = rule.global_mean()
        for k in tmpl:
            assert float((got[k] - want[k]).abs().max()) <= 1e-12 * float(want[k].abs().max()), (r, k)


def test_running_sums_are_recomputed_when_unset_and_on_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedbayes.algorithms.base as base

    monkeypatch.setattr(base, "RECOMPUTE_EVERY", 4)
    tmpl = {"w": torch.zeros(3)}
    rule = BayesADMM(tmpl, 3, BayesADMMConfig(rho=0.5, damping=0.5))
    site = DiagGaussian({"w": torch.ones(3, dtype=torch.float64)}, {"w": torch.full((3,), 2.0, dtype=torch.float64)})
    rule.aggregate(1, [ClientUpdate(0, 5, site=site)])
    # corrupt the running sum: the next ordinary round carries the error, the scheduled one (round 4) removes it
    assert rule.state.post_sum is not None
    rule.state = rule.state.replace(post_sum=rule.state.post_sum.scale(2.0))
    rule.aggregate(2, [ClientUpdate(1, 5, site=site)])
    assert not torch.allclose(rule.state.post_sum.prec["w"], rule.recomputed_sums()[0].prec["w"])
    rule.aggregate(3, [ClientUpdate(2, 5, site=site)])
    rule.aggregate(4, [ClientUpdate(0, 5, site=site)])
    assert torch.equal(rule.state.post_sum.prec["w"], rule.recomputed_sums()[0].prec["w"])
    # unset (an older checkpoint, fedbayes forget): recomputed before the round's changes are added
    rule.state = rule.state.without_derived()
    assert rule.state.post_sum is None and "post_sum" not in str(sorted(rule.state.to_tensors()))
    rule.aggregate(5, [ClientUpdate(1, 5, site=site)])
    want = rule.recomputed_sums()
    assert torch.allclose(rule.state.post_sum.prec["w"], want[0].prec["w"], rtol=1e-14, atol=0)


def test_a_rule_declares_its_state_types_once() -> None:
    """``class Rule(Algorithm[G, C])`` is the one place a rule names its state types: GlobalState/ClientState come
    from it (inherited by a subclass), and the running sums are the fields marked DERIVED where they are declared."""
    import dataclasses
    import types

    from fedbayes.algorithms.base import Algorithm
    from fedbayes.algorithms.bayes_admm import ADMMState, Client
    from fedbayes.algorithms.fedavg import MeanState
    from fedbayes.algorithms.sites import SiteClient, SiteState
    from fedbayes.algorithms.state import DERIVED, NoState, State

    assert (BayesADMM.GlobalState, BayesADMM.ClientState) == (ADMMState, Client)
    assert (PVI.GlobalState, PVI.ClientState) == (FedLapCov.GlobalState, FedLapCov.ClientState) == (SiteState,
                                                                                                    SiteClient)
    assert (FedAvg.GlobalState, FedAvg.ClientState) == (FedProx.GlobalState, FedProx.ClientState) == (MeanState,
                                                                                                      NoState)
    assert ADMMState.derived_fields() == ("post_sum", "dual_sum")
    assert FedADMM.GlobalState.derived_fields() == ("total",) and SiteState.derived_fields() == ("site_sum",)
    assert FedDyn.GlobalState.derived_fields() == ()

    @dataclasses.dataclass(frozen=True)
    class Sums(State):
        mean: dict[str, torch.Tensor] | None = None
        total: dict[str, torch.Tensor] | None = dataclasses.field(default=None, metadata=DERIVED)

    one = {"w": torch.ones(2)}
    st = Sums(mean=one, total=one).without_derived()
    assert st.total is None and st.mean is one
    with pytest.raises(TypeError, match=r"Algorithm\[GlobalState, ClientState\] takes two State classes"):
        types.new_class("Bad", (Algorithm[int, NoState],))  # type: ignore[type-var]
