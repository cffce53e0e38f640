"""Exclusion (``exclude-clients``, what-if retraining, ``forget``) pinned by hand-derived numbers.

A federation of K = 4 clients whose client 1 is excluded is a federation of the three clients {0, 2, 3}:
every average, every count and every K-dependent step (bayes-admm's α = 1/(1 + ρ·|active|), ρ = rho-k/|active|)
uses the three, and whatever the store still holds for client 1 (a run that is "forgetting" it) is left out of
every sum.  The expected values are written out as arithmetic here, never by calling the rule under test
(conventions of ``tests/test_algorithms.py``: three scalars w = (w₀, w₁), b = (b₀,); a Gaussian as [η; s]).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_algorithms import as_nat, close, flat, gauss, params, t  # the toy model's helpers (w: (2,), b: (1,))

from fedbayes.algorithms import Algorithm, ClientUpdate, bayes_admm, fedadmm, fedlap
from fedbayes.algorithms.bayes_admm import BayesADMM
from fedbayes.algorithms.fedadmm import FedADMM
from fedbayes.algorithms.feddyn import FedDyn
from fedbayes.algorithms.fedlap import FedLap
from fedbayes.algorithms.fedlap_cov import FedLapCov
from fedbayes.algorithms.pvi import PVI
from fedbayes.algorithms.sites import SiteClient

F64 = torch.float64
K = 4
ACTIVE = [0, 2, 3]
OUT = 1  # the excluded client
INIT = (0.5, -1.0, 2.0)


def make(cls: type[Algorithm], **cfg: Any) -> Algorithm:
    return cls(params(INIT), K, cls.Config(**cfg), active=ACTIVE)


SA = torch.stack([t(1.0, -2.0, 0.5), t(4.0, 1.0, 2.0)])
SB = torch.stack([t(0.25, 4.0, -1.0), t(1.0, 5.0, 1.5)])
JUNK = torch.stack([t(100.0, -70.0, 9.0), t(50.0, 60.0, 70.0)])  # what the store still holds for client 1


def test_bayes_admm_alpha_and_averages_use_the_active_clients() -> None:
    d, rho_k, gamma = 2.0, 1.5, 0.5
    rule = make(BayesADMM, prior_prec=d, rho_k=rho_k, damping=gamma, safe_prior=False)
    assert isinstance(rule, BayesADMM)
    n = len(ACTIVE)
    rho = rho_k / n  # 0.5, not rho_k / K = 0.375
    alpha = 1 / (1 + rho * n)  # 0.4, not 1/(1 + ρK)
    assert rule.rho == pytest.approx(rho, rel=1e-15) and rule.alpha == pytest.approx(alpha, rel=1e-15)
    rule.set_client(OUT, bayes_admm.Client(dual=gauss(JUNK), post=gauss(JUNK)))
    lam0 = torch.stack([t(0, 0, 0), t(d, d, d)])
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, site=gauss(SA)),
                       ClientUpdate(client=2, num_examples=30, site=gauss(SB))])
    post0, post2 = lam0 + SA, lam0 + SB  # λₖ = πₖ + site with πₖ = λ₀ in round 1
    dual0, dual2 = gamma * rho * (post0 - lam0), gamma * rho * (post2 - lam0)
    # mean over the active clients heard from (0 and 2; client 3 never seen is left out); client 1's stored
    # state is ignored, in the mean and in the count
    bar = (1 - alpha) * (post0 + post2) / 2 + alpha * (lam0 + dual0 + dual2)
    close(as_nat(rule.global_posterior()), bar)
    close(as_nat(rule.configure(2, 2).prior), bar - dual2 / rho)
    with pytest.raises(ValueError, match="client 1 is not part of this federation"):
        rule.aggregate(2, [ClientUpdate(client=OUT, num_examples=5, site=gauss(SA))])


@pytest.mark.parametrize("cls", [PVI, FedLapCov])
def test_site_rules_sum_only_active_sites(cls: type[Algorithm]) -> None:
    d, rho = 2.0, 0.5
    rule = make(cls, prior_prec=d, rho=rho)
    rule.set_client(OUT, SiteClient(site=gauss(JUNK)))
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, site=gauss(SA)),
                       ClientUpdate(client=3, num_examples=30, site=gauss(SB))])
    lam0 = torch.stack([t(0, 0, 0), t(d, d, d)])
    close(as_nat(rule.global_posterior()), lam0 + rho * SA + rho * SB)


def test_fedadmm_consensus_over_the_active_clients() -> None:
    rho = 0.5
    rule = make(FedADMM, rho=rho)
    rule.set_client(OUT, fedadmm.Client(local=params(t(9.0, 9.0, 9.0)), dual=params(t(3.0, 3.0, 3.0))))
    m0 = t(*INIT)
    ma, mc = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, mean=params(ma)),
                       ClientUpdate(client=2, num_examples=30, mean=params(mc))])
    g1 = (ma + mc + m0) / 3  # the three active clients; never-seen client 3 counts with the initial mean
    close(flat(rule.global_mean()), g1)


def test_feddyn_h_step_divides_by_the_active_count() -> None:
    a, wd = 0.5, 0.25
    rule = make(FedDyn, alpha=a, weight_decay=wd)
    m0 = t(*INIT)
    ma, mc = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, mean=params(ma)),
                       ClientUpdate(client=3, num_examples=30, mean=params(mc))])
    h = -(a / 3) * ((ma - m0) + (mc - m0))  # α/|active|, not α/K
    close(flat(rule.global_mean()), (ma + mc) / 2 - h / a)


def test_fedlap_global_sums_only_active_duals() -> None:
    d, rho_k = 2.0, 1.5
    rule = make(FedLap, prior_prec=d, rho_k=rho_k)
    rho = rho_k / 3
    rule.set_client(OUT, fedlap.Client(dual=params(t(100.0, 100.0, 100.0))))
    ma, mc = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, mean=params(ma)),
                       ClientUpdate(client=2, num_examples=30, mean=params(mc))])
    close(flat(rule.global_mean()), rho * ma + rho * mc)  # w_g = Σ_active vₖ from w_g = 0
