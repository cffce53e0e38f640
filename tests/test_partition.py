"""Tests for fedbayes.data.partition: coverage, reproducibility, heterogeneity and parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbayes.data.partition import PARTITIONERS, partition, split_summary


def labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled int64 labels with ``sizes[c]`` examples of class ``c``."""
    y = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    return np.random.default_rng(seed).permutation(y)


Y = labels([500, 450, 520, 480, 510, 300, 490, 530, 470, 500])  # 4,750 examples, 10 classes


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


def dominant_classes(parts: list[np.ndarray], y: np.ndarray, share: float = 0.05) -> float:
    """Mean number of classes that hold more than ``share`` of a client's examples."""
    counts = [np.bincount(y[p], minlength=y.max() + 1) / len(p) for p in parts]
    return float(np.mean([(c > share).sum() for c in counts]))


def test_registry_names() -> None:
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shards", "paper"}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_disjoint_and_covering(scheme: str, num_clients: int) -> None:
    parts = partition(Y, num_clients, scheme, seed=3)
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, len(Y))


@pytest.mark.parametrize(("scheme", "params"), [("iid", {}), ("dirichlet", {}), ("shards", {"classes_per_client": 2})])
def test_reproducible_for_a_seed_and_different_for_another(scheme: str, params: dict[str, int]) -> None:
    a = partition(Y, 20, scheme, seed=11, **params)
    b = partition(Y, 20, scheme, seed=11, **params)
    c = partition(Y, 20, scheme, seed=12, **params)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition(Y, 13, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(Y)


def test_dirichlet_large_class_alpha_gives_the_global_class_mix() -> None:
    parts = partition(Y, 10, "dirichlet", seed=0, class_alpha=1e6, size_alpha=1e6)
    global_mix = np.bincount(Y) / len(Y)
    for p in parts:
        mix = np.bincount(Y[p], minlength=10) / len(p)
        assert np.abs(mix - global_mix).max() < 0.01
    assert dominant_classes(parts, Y) == 10


def test_dirichlet_small_class_alpha_gives_skewed_mixes() -> None:
    skewed = dominant_classes(partition(Y, 20, "dirichlet", seed=0, class_alpha=0.05), Y)
    default = dominant_classes(partition(Y, 20, "dirichlet", seed=0), Y)  # class_alpha = 0.5
    assert skewed < 3  # one or two dominant classes per client
    assert 4 < default < 10


def test_dirichlet_size_alpha_controls_size_skew() -> None:
    even = np.array([len(p) for p in partition(Y, 10, "dirichlet", seed=1, size_alpha=1e6, class_alpha=1e6)])
    assert np.abs(even - len(Y) / 10).max() <= 2
    skew = np.array([len(p) for p in partition(Y, 10, "dirichlet", seed=1, size_alpha=0.2, class_alpha=1e6)])
    assert skew.max() > 3 * skew.min()
    assert skew.max() / skew.mean() > 2


@pytest.mark.parametrize("min_size", [1, 2, 10])
def test_dirichlet_min_size(min_size: int) -> None:
    parts = partition(Y[:1000], 100, "dirichlet", seed=5, size_alpha=0.05, class_alpha=0.05, min_size=min_size)
    assert_disjoint_cover(parts, 1000)
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_regression_targets_fall_back_to_size_skew() -> None:
    y = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    parts = partition(y, 10, "dirichlet", seed=0, size_alpha=0.3)
    assert_disjoint_cover(parts, 1000)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 2 and max(sizes) > 2 * min(sizes)
    with pytest.raises(ValueError, match="class labels"):
        partition(y, 10, "shards", seed=0)


def test_shards_exact_classes_and_per_class_count() -> None:
    y = labels([600] * 10)  # the papers' MNIST split, scaled down: 100 clients x 2 classes
    parts = partition(y, 100, "shards", seed=0, classes_per_client=2, per_class=30)
    assert len(parts) == 100
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx) == 100 * 2 * 30
    uses = np.zeros(10, dtype=int)
    for p in parts:
        classes, counts = np.unique(y[p], return_counts=True)
        assert len(classes) == 2
        assert np.all(counts == 30)
        uses[classes] += 1
    assert np.all(uses == 20)  # least-assigned-first with max_uses = 100 * 2 / 10


def test_shards_first_class_is_the_least_assigned() -> None:
    y = labels([100] * 10)
    parts = partition(y, 50, "shards", seed=0, classes_per_client=1, max_uses=50, per_class=5)
    uses = np.bincount([int(y[p[0]]) for p in parts], minlength=10)
    assert np.all(uses == 5)  # with no binding cap, picking the least-assigned class balances usage


def test_shards_default_per_class_fits_the_smallest_class() -> None:
    parts = partition(Y, 20, "shards", seed=2, classes_per_client=3)
    per = {len(p) for p in parts}
    assert len(per) == 1
    counts = np.unique(Y[parts[0]], return_counts=True)[1]
    assert len(counts) == 3 and len(set(counts.tolist())) == 1
    # 60 slots over 10 classes -> each class used 6 times; the smallest class (300) limits per_class to 50
    assert counts[0] == 300 // 6


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    num_clients=st.integers(1, 30),
    k=st.integers(1, 4),
    per_class=st.none() | st.integers(1, 10),
    max_uses=st.none() | st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_shards_valid_or_clear_error(
    sizes: list[int], num_clients: int, k: int, per_class: int | None, max_uses: int | None, seed: int
) -> None:
    y = labels(sizes, seed)
    params = {"classes_per_client": k, "per_class": per_class, "max_uses": max_uses}
    try:
        parts = partition(y, num_clients, "shards", seed=seed, **params)
    except ValueError as err:
        assert any(w in str(err) for w in ("classes_per_client", "num_clients", "per_class", "max_uses", "slots"))
        return
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    sizes_per_client = set()
    for p in parts:
        classes, counts = np.unique(y[p], return_counts=True)
        assert len(classes) == k
        assert len(set(counts.tolist())) == 1
        if per_class is not None:
            assert counts[0] == per_class
        sizes_per_client.add(len(p))
    assert len(sizes_per_client) == 1


@pytest.mark.parametrize(
    ("scheme", "num_clients", "params", "match"),
    [
        ("iid", 0, {}, "num_clients"),
        ("iid", 5000, {}, "num_clients"),
        ("dirichlet", 10, {"class_alpha": 0}, "class_alpha"),
        ("dirichlet", 10, {"class_alpha": -1.0}, "class_alpha"),
        ("dirichlet", 10, {"size_alpha": float("nan")}, "size_alpha"),
        ("dirichlet", 10, {"size_alpha": "big"}, "size_alpha"),
        ("dirichlet", 10, {"min_size": 0}, "min_size"),
        ("dirichlet", 3000, {}, "num_clients"),
        ("shards", 10, {"classes_per_client": 11}, "classes_per_client"),
        ("shards", 10, {"classes_per_client": 0}, "classes_per_client"),
        ("shards", 10, {"per_class": 0}, "per_class"),
        ("shards", 10, {"per_class": 10_000}, "per_class"),
        ("shards", 100, {"max_uses": 0}, "max_uses"),
        ("shards", 100, {"per_class": 300}, "slots"),  # papers' 100 x 2 x 300 does not fit 4,750 examples
        ("shards", 100, {"max_uses": 5}, "slots"),
        ("iid", 10, {"class_alpha": 0.5}, "class_alpha"),
    ],
)
def test_bad_params_raise(scheme: str, num_clients: int, params: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(Y, num_clients, scheme, seed=0, **params)


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"iid, dirichlet, shards"):
        partition(Y, 10, "pathological", seed=0)


def test_split_summary_is_one_line() -> None:
    parts = partition(Y, 10, "shards", seed=0, classes_per_client=2, per_class=40)
    line = split_summary(parts, Y)
    assert "\n" not in line
    assert line.startswith("10 clients, 800 examples")
    assert "size min/median/max 80/80/80" in line
    assert "classes per client min/median/max 2/2/2" in line
    reg = split_summary([np.arange(3), np.arange(3, 10)], np.zeros(10, np.float32))
    assert "classes" not in reg and "3/5/7" in reg
