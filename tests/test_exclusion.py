"""Exclusion (``exclude-clients``, what-if retraining, ``forget``) pinned by hand-derived numbers.

A federation of K = 4 clients whose client 1 is excluded is a federation of the three clients {0, 2, 3}:
every average, every count and every K-dependent step (bayes-admm's α = 1/(1 + ρ·|active|), ρ = rho-k/|active|)
uses the three, and whatever the store still holds for client 1 (a run that is "forgetting" it) is left out of
every sum.  The expected values are written out as arithmetic here, never by calling the rule under test
(conventions of ``tests/test_algorithms.py``: three scalars w = (w₀, w₁), b = (b₀,); a Gaussian as [η; s]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
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


@pytest.mark.parametrize("mean", ["heard", "participants"])
def test_bayes_admm_server_mean_under_partial_participation(mean: str) -> None:
    """Round 2 hears only client 0: ``heard`` averages its new λ₀' with client 2's stale λ₂, ``participants``
    (as FedDyn) uses λ₀' alone; both keep the duals of every client in α(λ₀ + Σλ̂ₖ).  With every active client
    replying (round 3) the two are the same equation."""
    d, rho_k, gamma = 2.0, 1.5, 0.5
    rule = make(BayesADMM, prior_prec=d, rho_k=rho_k, damping=gamma, safe_prior=False, server_mean=mean)
    rho = rho_k / 3
    alpha = 1 / (1 + rho * 3)
    lam0 = torch.stack([t(0, 0, 0), t(d, d, d)])
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, site=gauss(SA)),
                       ClientUpdate(client=2, num_examples=30, site=gauss(SB))])
    post0, post2 = lam0 + SA, lam0 + SB
    dual0, dual2 = gamma * rho * (post0 - lam0), gamma * rho * (post2 - lam0)
    bar1 = (1 - alpha) * (post0 + post2) / 2 + alpha * (lam0 + dual0 + dual2)  # round 1: the same for both
    close(as_nat(rule.global_posterior()), bar1)
    sc = torch.stack([t(0.5, 0.5, -0.5), t(2.0, 1.0, 3.0)])
    rule.aggregate(2, [ClientUpdate(client=0, num_examples=10, site=gauss(sc))])
    post0b = bar1 - dual0 / rho + sc  # λₖ = πₖ + site, πₖ = λ̄ − λ̂ₖ/ρ
    dual0b = dual0 + gamma * rho * (post0b - bar1)
    mean_post = post0b if mean == "participants" else (post0b + post2) / 2
    bar2 = (1 - alpha) * mean_post + alpha * (lam0 + dual0b + dual2)
    close(as_nat(rule.global_posterior()), bar2)
    sites = {0: SA, 2: SB, 3: sc}
    priors = {c: as_nat(rule.configure(c, 3).prior) for c in ACTIVE}
    rule.aggregate(3, [ClientUpdate(client=c, num_examples=10, site=gauss(sites[c])) for c in ACTIVE])
    posts = {c: priors[c] + sites[c] for c in ACTIVE}
    duals = {0: dual0b, 2: dual2, 3: 0 * dual2}
    duals = {c: duals[c] + gamma * rho * (posts[c] - bar2) for c in ACTIVE}
    bar3 = (1 - alpha) * sum(posts.values()) / 3 + alpha * (lam0 + sum(duals.values()))
    close(as_nat(rule.global_posterior()), bar3)


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


def test_fedlap_rho_k_is_per_participant_under_partial_participation() -> None:
    """rho-k = |S|ρ with |S| the expected participants per round: two of the three active clients a round and
    rho-k = 1 make round 1 exactly the participants' average (from w_g = 0); ρ = rho-k/K would give a third of
    the step's weight to each instead of a half."""
    rule = FedLap(params(INIT), K, FedLap.Config(prior_prec=2.0, rho_k=1.0), active=ACTIVE, participants=2)
    assert rule.rho == 0.5
    ma, mc = t(1.0, 2.0, 3.0), t(5.0, 6.0, -1.0)
    rule.aggregate(1, [ClientUpdate(client=0, num_examples=10, mean=params(ma)),
                       ClientUpdate(client=2, num_examples=30, mean=params(mc))])
    close(flat(rule.global_mean()), (ma + mc) / 2)
    # the other rules' n stays K: bayes-admm's α = 1/(1 + ρK) and ess depend on ρK, not on participation
    admm = BayesADMM(params(INIT), K, BayesADMM.Config(rho_k=1.5), active=ACTIVE, participants=2)
    assert admm.rho == 0.5 and admm.alpha == pytest.approx(1 / (1 + 0.5 * 3))


def test_bayes_admm_default_rho_does_not_move_with_k() -> None:
    """With neither rho nor rho-k, bayes-admm's ρ is 0.2 whatever the federation's size (α = 1/(1 + 0.2·|active|));
    rho-k keeps meaning ρK; the other ρK-parametrised rules keep their default rho-k / n."""
    admm = BayesADMM(params(INIT), K, BayesADMM.Config(), active=ACTIVE)
    assert admm.rho == 0.2 and admm.alpha == pytest.approx(1 / (1 + 0.2 * 3))
    for k in (1, 10, 100, 10_000):
        assert BayesADMM.Config().effective_rho(k) == 0.2
        assert BayesADMM.Config(rho_k=2.0).effective_rho(k) == pytest.approx(2.0 / k)
    assert FedLap.Config().effective_rho(4) == pytest.approx(FedLap.Config.default_rho_k / 4)


def test_fedlap_cov_damping_bound_is_per_participant() -> None:
    """fedlap-cov's ρ ≤ 2/|S|: rho = 0.5 is a full step for |S| = 2 participants a round but diverges for 3
    (the server step is |S|ρ); the config check and the constructor say so, naming |S|."""
    FedLapCov(params(INIT), K, FedLapCov.Config(rho=0.9), active=ACTIVE, participants=2)
    with pytest.raises(ValueError, match=r"2/\|S\| = 0.666667 for \|S\|=3"):
        FedLapCov(params(INIT), K, FedLapCov.Config(rho=0.9), active=ACTIVE)
    with pytest.raises(ValueError, match="participants must be >= 1"):
        FedLap(params(INIT), K, FedLap.Config(), participants=0)


def test_resolve_reads_participants_per_round_for_the_damping_check() -> None:
    from fedbayes.config import ConfigError, resolve

    base = {"algorithm": "fedlap-cov", "dataset": "digits", "num-clients": 10, "rho": 0.5}
    resolve({**base, "clients-per-round": 0.4})  # |S| = 4: 0.5 ≤ 2/4
    with pytest.raises(ConfigError, match=r"\|S\|=10 participants"):
        resolve(base)


# ------------------------------------------------- against a federation that never had the client (the engine)
def federation_without(flat: dict[str, Any], out: list[int], monkeypatch: pytest.MonkeyPatch
                       ) -> tuple[list[dict[str, Any]], Any, list[int]]:
    """Train, from scratch, a federation of K − |out| clients (``num-clients`` = K − |out|, nothing excluded) whose
    client j holds the data of the j-th kept client of the K-client partition and trains with that client's
    seeds; returns (rows, federation, kept ids).  No exclusion code runs: the rule is built for the smaller K, the
    participants are drawn from its own pool.

    What must hold, and why: the model initialisation depends on the seed only; ``participants`` draws indices
    into the pool of available clients with a generator seeded by (seed, round), and the pool of the K-client run
    with ``out`` excluded is the kept ids in order, so index j picks kept[j] there and j here; the number per
    round is a fraction of the available clients in both; each client trains on the same data with the same seed
    under the prior the rule sends, and the rules count the same clients.  So the run with ``exclude-clients =
    out`` is this federation with its clients renamed j → kept[j], bit for bit."""
    import dataclasses

    import fedbayes.rounds as rounds
    from fedbayes.config import resolve
    from fedbayes.engine import run_rounds
    from fedbayes.federation import Federation, load_partitioned

    k = int(flat["num-clients"])
    kept = [c for c in range(k) if c not in out]
    _, parts, _ = load_partitioned(resolve({**flat, "exclude-clients": []}))  # the partition over all K
    exp = resolve({**flat, "num-clients": len(kept), "exclude-clients": []})
    fed = Federation.build(exp)
    assert fed.rule.K == len(kept) and fed.rule.active == list(range(len(kept)))
    fed = dataclasses.replace(fed, parts=[parts[c] for c in kept],
                              client_data=[(torch.from_numpy(fed.data.x_train[parts[c]]),
                                            torch.from_numpy(fed.data.y_train[parts[c]]).long()) for c in kept])
    real_seed = rounds.client_seed
    monkeypatch.setattr(rounds, "client_seed", lambda seed, r, j: real_seed(seed, r, kept[j]))
    rows = run_rounds(fed, exp, [], None, checkpoint=False)
    monkeypatch.setattr(rounds, "client_seed", real_seed)
    return rows, fed, kept


def same_run(rows: list[dict[str, Any]], rule: Algorithm, ref_rows: list[dict[str, Any]], ref_rule: Algorithm,
             kept: list[int]) -> None:
    """The two runs are the same up to renaming client j → kept[j]: the posterior, bit for bit, and each round's
    participants, failures and test metrics."""
    a, b = rule.global_posterior(), ref_rule.global_posterior()
    assert a is not None and b is not None
    for k in a.eta:
        assert torch.equal(a.eta[k], b.eta[k]) and torch.equal(a.prec[k], b.prec[k]), k
    assert len(rows) == len(ref_rows)
    for r, s in zip(rows, ref_rows, strict=True):
        assert [kept[j] for j in r["participants"]] == s["participants"], r["round"]
        assert [kept[j] for j in r["failed"]] == s["failed"], r["round"]
        for key in ("test_accuracy", "test_nll"):
            assert r[key] == s[key], (r["round"], key)


SMALL = {"dataset": "digits", "num-clients": 4, "rounds": 3, "hidden": "8", "epochs": 1, "bma-samples": 0,
         "seed": 1, "partition": "dirichlet"}


@pytest.mark.parametrize(("algo", "extra"), [("bayes-admm", {"rho-k": 1.0}), ("pvi", {}),
                                             ("bayes-admm", {"clients-per-round": 0.6})])
def test_exclusion_is_a_federation_that_never_had_the_client(algo: str, extra: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's ``exclude-clients = [1]`` against a 3-client federation built without client 1's data
    (:func:`federation_without`): the same run, renamed.  Partial participation (2 of the 3 available per round)
    checks that the number drawn is a fraction of the available clients (0.6 of 3 is 2; of 4 it would be 3).

    Caught mutations (each fails the bayes-admm cases; the comparisons in tests/test_whatif.py ran the same
    exclusion code on both sides and could not fail)::

        # fedbayes/engine.py, Federation.build: the rule not told who is excluded (ρ, α over K = 4)
        -        active = [c for c in range(run.num_clients) if c not in set(run.exclude_clients)]
        +        active = list(range(run.num_clients))

        # fedbayes/config.py, participants_per_round: the fraction taken of K, not of the available clients
        -        available = self.num_clients - len(set(self.exclude_clients))
        +        available = self.num_clients
    """
    from fedbayes.config import resolve
    from fedbayes.engine import run_rounds
    from fedbayes.federation import Federation

    flat = {**SMALL, "algorithm": algo, **extra}
    rows, fed, kept = federation_without(flat, [1], monkeypatch)
    exp = resolve({**flat, "exclude-clients": [1]})
    ref = Federation.build(exp)
    ref_rows = run_rounds(ref, exp, [], None, checkpoint=False)
    assert all(1 not in r["participants"] for r in ref_rows)
    same_run(rows, fed.rule, ref_rows, ref.rule, kept)


def _draws(seed: int, rounds: int, k: int) -> dict[tuple[int, int], float]:
    """The documented draw of ``injected_failure`` (fedbayes/rounds.py), written out: u ~ U[0, 1) from a
    generator seeded by (seed, round, client, 0xFA11); failed when u < fail-rate, a straggler when
    fail-rate ≤ u < fail-rate + straggler-rate."""
    return {(r, c): float(np.random.default_rng([seed, r, c, 0xFA11]).random())
            for r in range(1, rounds + 1) for c in range(k)}


def test_injected_failures_are_clients_that_were_never_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with ``fail-rate`` 0.2 and ``straggler-rate`` 0.3 against the same run with no rates in which the
    (round, client) pairs the documented draw drops are simply never reached (the ``fail`` hook): both must be
    bit-identical (an absent client trains nothing and stays stale, whatever the reason), with the same failed
    clients each round.  The seed is chosen so that the draws hold a failure, a straggler, and a straggler whose
    u lies above straggler-rate alone (so ``u < straggler-rate`` would keep it).

    Caught mutations (each was caught before only by a seed-dependent statistical check)::

        # fedbayes/rounds.py, injected_failure: the straggler threshold without the fail-rate
        -    if u < exp.run.fail_rate + exp.run.straggler_rate:
        +    if u < exp.run.straggler_rate:

        # fedbayes/rounds.py, Round.job: stragglers still trained and aggregated
        -        if not reachable or injected_failure(self.exp, r, client) is not None:
        +        if not reachable or injected_failure(self.exp, r, client) == "failed":
    """
    from fedbayes.config import resolve
    from fedbayes.engine import run_rounds
    from fedbayes.federation import Federation

    fail, strag = 0.2, 0.3
    flat = {**SMALL, "algorithm": "bayes-admm", "rounds": 4, "seed": 3}
    u = _draws(3, 4, 4)
    dropped = {rc for rc, v in u.items() if v < fail + strag}
    assert any(v < fail for v in u.values()) and any(max(fail, strag) <= v < fail + strag for v in u.values())
    assert len(dropped) < len(u) - 4  # most clients still reply
    exp = resolve({**flat, "fail-rate": fail, "straggler-rate": strag})
    injected = Federation.build(exp)
    rows = run_rounds(injected, exp, [], None, checkpoint=False)
    exp0 = resolve(flat)
    hooked = Federation.build(exp0)
    ref_rows = run_rounds(hooked, exp0, [], None, checkpoint=False, fail=lambda r, c: (r, c) in dropped)
    for r in rows:
        assert r["failed"] == sorted(c for c in range(4) if (r["round"], c) in dropped), r["round"]
        assert r["failed_reasons"] == {}, r["round"]  # absent, not failed with an error
    same_run(rows, injected.rule, ref_rows, hooked.rule, list(range(4)))
