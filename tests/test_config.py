"""Run configuration, schedules and participation."""

from __future__ import annotations

import math

import pytest

from fedbayes.algorithms import cosine_lr
from fedbayes.config import ConfigError, resolve
from fedbayes.rounds import injected_failure, participants


def test_cosine_schedule_by_hand() -> None:
    # lr_r = ½(1 + cos(π(r−1)/R)): r=1 -> 1, r=6 of 10 -> ½, r=10 -> ½(1 + cos(0.9π)) > 0
    assert cosine_lr(0.2, 1, 10) == pytest.approx(0.2)
    assert cosine_lr(0.2, 6, 10) == pytest.approx(0.1)
    assert cosine_lr(0.2, 10, 10) == pytest.approx(0.1 * (1 + math.cos(0.9 * math.pi)))
    assert cosine_lr(0.2, 10, 10) > 0


def test_snake_and_kebab_keys_and_roundtrip() -> None:
    a = resolve({"num_clients": 5, "batch-size": 16, "algorithm": "pvi", "rho": 0.5})
    assert a.run.num_clients == 5 and a.run.batch_size == 16 and a.algo.rho == 0.5  # type: ignore[attr-defined]
    assert resolve(a.to_flat()) == a


@pytest.mark.parametrize(
    "flat,needle",
    [
        ({"algorithm": "pvi", "rho": 0.0}, "rho"),
        ({"algorithm": "bayes-admm", "damping": 1.5}, "damping"),
        ({"algorithm": "bayes-admm", "prior-prec": -1}, "prior-prec"),
        ({"temperature": 0}, "temperature"),
        ({"clients-per-round": 2.5}, "clients-per-round"),
        ({"fail-rate": 1.0}, "fail-rate"),
        ({"hidden": "10,x"}, "hidden"),
        ({"exclude-clients": "0,1", "num-clients": 2}, "no client"),
        ({"algorithm": "fedavg", "rho": 0.1}, "unknown config key(s) ['rho']"),
    ],
)
def test_bad_values_name_the_key(flat: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(flat)
    assert needle in str(err.value)


def test_participation_fraction_count_and_exclusion() -> None:
    e = resolve({"num-clients": 10, "clients-per-round": 0.3, "seed": 4})
    chosen = participants(e, 7)
    assert len(chosen) == 3 and chosen == sorted(chosen) and chosen == participants(e, 7)
    assert any(participants(e, r) != chosen for r in range(1, 6))
    e2 = resolve({"num-clients": 10, "clients-per-round": 4, "exclude-clients": "2,3"})
    for r in range(1, 20):
        got = participants(e2, r)
        assert len(got) == 4 and not {2, 3} & set(got)


def test_injected_failures_are_seeded_and_follow_the_rate() -> None:
    e = resolve({"num-clients": 10, "fail-rate": 0.3, "straggler-rate": 0.1, "seed": 1})
    draws = [injected_failure(e, r, c) for r in range(1, 201) for c in range(10)]
    assert draws == [injected_failure(e, r, c) for r in range(1, 201) for c in range(10)]
    assert abs(draws.count("failed") / len(draws) - 0.3) < 0.03
    assert abs(draws.count("straggler") / len(draws) - 0.1) < 0.02
    assert injected_failure(resolve({}), 1, 0) is None
