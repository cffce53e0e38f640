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
        ({"algorithm": "fedavg", "rho": 0.1}, "unknown config key for algorithm 'fedavg': 'rho'"),
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


# --- one schema for local settings: RunConfig's local keys and the wire codec come from LocalSettings ----------

def _violations(name: str) -> list[object]:
    """Values LocalSettings' bounds reject for a numeric field (derived from its metadata, not written by hand)."""
    from annotated_types import Ge, Gt, Lt

    from fedbayes.local import LocalSettings

    out: list[object] = []
    for m in LocalSettings.model_fields[name].metadata:
        if isinstance(m, Gt):
            out.append(m.gt)
        elif isinstance(m, Ge):
            out.append(m.ge - 1)
        elif isinstance(m, Lt):
            out.append(m.lt)
    return out


def test_run_config_local_keys_are_the_schema_user_keys() -> None:
    from fedbayes.config import LOCAL_KEYS, RunConfig
    from fedbayes.local import RULE_KEYS, LocalSettings

    assert set(LOCAL_KEYS) | set(RULE_KEYS) == set(LocalSettings.model_fields)
    assert set(LOCAL_KEYS) <= set(RunConfig.model_fields)
    # the rule's own settings are no run keys (the run's seed and device are the run's, of another meaning)
    assert set(RULE_KEYS) & set(RunConfig.model_fields) == {"seed", "device"}
    assert all(RunConfig.model_fields[k].default is None for k in LOCAL_KEYS)
    # a rule-owned setting is not a run key
    with pytest.raises(ConfigError, match=r"unknown config key for algorithm 'bayes-admm': 'ess-scale'"):
        resolve({"ess-scale": 2.0})


@pytest.mark.parametrize("name", ["epochs", "batch_size", "lr", "temperature", "mc_samples", "hess_init", "beta1",
                                  "beta2", "clip_radius", "momentum", "grad_clip", "max_steps", "noise_var"])
def test_run_key_bounds_are_the_schema_bounds(name: str) -> None:
    from fedbayes.local import LocalSettings

    bad = _violations(name)
    assert bad, f"{name} has no bound in the schema"
    key = name.replace("_", "-")
    for v in bad:
        with pytest.raises(ConfigError, match=key):
            resolve({key: v})
        with pytest.raises(ValueError, match=key):
            LocalSettings.from_wire({key: v})


def test_wire_codec_roundtrip_and_errors() -> None:
    from fedbayes.local import LocalSettings

    s = LocalSettings(mode="adam", epochs=3, lr=0.02, clip_radius=math.inf, signed_site=True, seed=7, beta1=0.5)
    wire = s.to_wire()
    assert wire["batch-size"] == 32 and wire["signed-site"] is True and wire["beta2"] == 0.999  # adam's default
    assert LocalSettings.from_wire({**wire, "reply": "site", "round": 3}) == s  # message keys are not settings
    assert LocalSettings.from_wire(wire, device="cuda").device == "cuda"
    assert LocalSettings(mode="ivon").beta2 == 0.9999 and LocalSettings(mode="sgd", beta2=0.5).beta2 == 0.5
    with pytest.raises(ValueError, match=r"mode.*'newton'"):
        LocalSettings.from_wire({"mode": "newton"})
    with pytest.raises(ValueError, match="lr"):
        LocalSettings.from_wire({"lr": math.inf})


def test_local_setting_precedence() -> None:
    # the user's key, else the rule's local default, else the schema's
    exp = resolve({"algorithm": "fedavg"})
    assert exp.local_setting("lr") == 1e-3 and exp.local_setting("mode") == "adam"
    assert exp.local_setting("noise_var") == 1.0
    assert resolve({"algorithm": "fedavg", "lr": 0.5}).local_setting("lr") == 0.5
