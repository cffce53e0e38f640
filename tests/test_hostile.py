"""Hostile and malformed replies: every bad reply is rejected with a reason, and the global state afterwards is
bit-identical to a run in which those replies never arrived (property-based, hypothesis)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbayes.algorithms import get_algorithm
from fedbayes.protocol import InvalidReply, decode_reply

SHAPES = {"w": (3, 2), "b": (2,)}
TRIED = {"hostile": 0}


def _rule(name: str):  # type: ignore[no-untyped-def]
    template = {k: torch.zeros(s) for k, s in SHAPES.items()}
    cls = get_algorithm(name)
    return cls(template, 3, cls.Config())


def _good(rng: np.random.Generator, site: bool) -> dict[str, dict[str, np.ndarray]]:
    if site:
        return {
            "site.eta": {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()},
            "site.prec": {k: rng.uniform(0.0, 5.0, size=s).astype(np.float32) for k, s in SHAPES.items()},
        }
    return {"mean": {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}}


CORRUPTIONS = [
    "nan", "inf", "neg_prec", "shape", "int_dtype", "complex", "name", "missing_record", "extra_record",
    "missing_param", "extra_param", "absurd", "oversized", "n_negative", "n_zero", "n_float", "n_bool",
    "n_nan", "n_mismatch", "n_missing", "n_huge", "not_array", "string_dtype", "half_site",
]


def _corrupt(records: dict[str, dict[str, Any]], metrics: dict[str, Any], kind: str, site: bool,
             rng: np.random.Generator) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    rec = {r: dict(v) for r, v in records.items()}
    met = dict(metrics)
    key = "site.prec" if site else "mean"
    first = next(iter(rec))
    if kind == "nan":
        rec[first]["w"] = rec[first]["w"].copy()
        rec[first]["w"][0, 0] = np.nan
    elif kind == "inf":
        rec[first]["b"] = rec[first]["b"].copy()
        rec[first]["b"][1] = -np.inf
    elif kind == "neg_prec":
        if not site:
            rec["mean"]["w"] = np.full((4, 4), 1.0, np.float32)  # shape error instead
        else:
            rec["site.prec"]["w"] = rec["site.prec"]["w"].copy()
            rec["site.prec"]["w"][1, 1] = -1e-3
    elif kind == "shape":
        rec[key]["w"] = np.zeros((2, 3), np.float32)
    elif kind == "int_dtype":
        rec[key]["b"] = np.array([1, 2], np.int64)
    elif kind == "complex":
        rec[key]["b"] = np.array([1 + 1j, 2], np.complex64)
    elif kind == "name":
        rec[key]["W"] = rec[key].pop("w")
    elif kind == "missing_record":
        del rec[first]
    elif kind == "extra_record":
        rec["prior.eta"] = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    elif kind == "missing_param":
        del rec[key]["b"]
    elif kind == "extra_param":
        rec[key]["c"] = np.zeros(3, np.float32)
    elif kind == "absurd":
        rec[first]["w"] = np.full((3, 2), 1e35, np.float32)
    elif kind == "oversized":
        rec[key]["w"] = np.zeros((3, 2, 10_000), np.float32)
    elif kind == "n_negative":
        met["num-examples"] = -5
    elif kind == "n_zero":
        met["num-examples"] = 0
    elif kind == "n_float":
        met["num-examples"] = 10.5
    elif kind == "n_bool":
        met["num-examples"] = True
    elif kind == "n_nan":
        met["num-examples"] = math.nan
    elif kind == "n_mismatch":
        met["num-examples"] = 11
    elif kind == "n_missing":
        del met["num-examples"]
    elif kind == "n_huge":
        met["num-examples"] = 10**12
    elif kind == "not_array":
        rec[key]["w"] = [[0.0, 0.0]] * 3
    elif kind == "string_dtype":
        rec[key]["b"] = np.array(["a", "b"])
    elif kind == "half_site":
        if site:
            del rec["site.eta"]
        else:
            rec["site.prec"] = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    return rec, met


def _decode(rule, rec, met, client):  # type: ignore[no-untyped-def]
    return decode_reply(rec, met, client=client, shapes=SHAPES, need_site=rule.needs_site(), expected_examples=10)


@pytest.mark.parametrize("algo", ["fedavg", "fedadmm", "feddyn", "pvi", "bayes-admm"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), kinds=st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=4),
       rounds=st.integers(1, 3))
def test_hostile_replies_leave_state_bit_identical(algo: str, seed: int, kinds: list[str], rounds: int) -> None:
    rng = np.random.default_rng(seed)
    clean, mixed = _rule(algo), _rule(algo)
    site = clean.needs_site()
    for r in range(1, rounds + 1):
        good = [(_good(rng, site), {"num-examples": 10, "train-loss": 0.5}, c) for c in range(3) if rng.random() < 0.8]
        bad = []
        for kind in kinds:
            base, met, c = (_good(rng, site), {"num-examples": 10}, int(rng.integers(0, 3)))
            bad.append((*_corrupt(base, met, kind, site, rng), c, kind))
        for c in range(3):  # configure is part of the state machine too
            clean.configure(c, r)
            mixed.configure(c, r)
        clean.aggregate(r, [_decode(clean, rec, met, c) for rec, met, c in good])
        accepted = []
        order = list(range(len(good) + len(bad)))
        rng.shuffle(order)
        for i in order:
            if i < len(good):
                rec, met, c = good[i]
                accepted.append(_decode(mixed, rec, met, c))
            else:
                rec, met, c, kind = bad[i - len(good)]
                TRIED["hostile"] += 1
                with pytest.raises(InvalidReply) as err:
                    _decode(mixed, rec, met, c)
                assert str(err.value), kind
        # the accepted replies are exactly the good ones; aggregate them in client order, as the clean run does
        accepted.sort(key=lambda u: u.client)
        mixed.aggregate(r, accepted)
    a, b = clean.state_tensors(), mixed.state_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_each_corruption_is_rejected_with_a_reason() -> None:
    rng = np.random.default_rng(0)
    for algo in ("fedavg", "pvi"):
        rule = _rule(algo)
        site = rule.needs_site()
        for kind in CORRUPTIONS:
            rec, met = _corrupt(_good(rng, site), {"num-examples": 10}, kind, site, rng)
            with pytest.raises(InvalidReply, match=r"\w"):
                _decode(rule, rec, met, 0)


def test_zero_site_precision_is_a_valid_flat_factor() -> None:
    # a site with zero precision carries no information (IVON floors negative curvature at 0): accepted
    rule = _rule("pvi")
    rec = {"site.eta": {k: np.zeros(s, np.float32) for k, s in SHAPES.items()},
           "site.prec": {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}}
    u = _decode(rule, rec, {"num-examples": 10}, 1)
    assert u.site is not None and float(u.site.prec["w"].sum()) == 0.0


def teardown_module() -> None:
    print(f"\n[hostile] replies tried and rejected: {TRIED['hostile']}")
