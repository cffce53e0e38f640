"""The reference code's own Fashion-MNIST split (``partition = "paper"``), raw pixels and the pooled baseline.

The exact numbers come from /work/shared/reference/paper-split.md (the split that team-approx-bayes/bayes-admm
builds for ``fashionmnist_10p_non_iid`` / ``_iid`` with seed 62).  The tests on the real data skip when
Fashion-MNIST is not cached (``fedbayes data fetch fmnist``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedbayes.config import ConfigError, resolve
from fedbayes.data import data_dir, load_dataset, partition, pool
from fedbayes.data.partition import paper_counts
from fedbayes.federation import client_parts
from fedbayes.presets import centralized_config, load_preset

# paper-split.md: client -> (N_k, class counts 0..9, sha256[:16] of the sorted int64 indices)
NON_IID = [
    (30, [2, 0, 7, 16, 0, 0, 0, 0, 3, 2], "21c0fb591e238107"),
    (499, [6, 29, 7, 79, 12, 183, 73, 91, 17, 2], "e238d548563cb2d2"),
    (1301, [87, 239, 16, 146, 269, 16, 159, 25, 188, 156], "97af4497d0719013"),
    (409, [65, 15, 3, 186, 4, 69, 2, 2, 60, 3], "0fdaded61cc38d63"),
    (749, [11, 5, 78, 91, 19, 119, 37, 297, 79, 13], "e9c28c1d2da84c54"),
    (189, [15, 35, 24, 12, 21, 8, 11, 2, 6, 55], "e8d4a648ab710e3e"),
    (654, [174, 0, 89, 2, 42, 11, 251, 10, 75, 0], "c99082b2ce2b6a7b"),
    (160, [50, 70, 3, 3, 2, 4, 2, 11, 6, 9], "5731d985d68a571f"),
    (229, [6, 2, 35, 64, 10, 34, 11, 13, 47, 7], "992f8026106921bf"),
    (1789, [185, 207, 339, 2, 220, 157, 56, 151, 118, 354], "b5351ae53fb51ca2"),
]
NON_IID_HEAD = [48291, 26512, 7872, 13640, 57455]
IID_HEAD = [37899, 24237, 25495, 19735, 35721]
IID_HASH = "1fd456ba92f22e01"
PAPER = {"per_class": 600}
IID = {"per_class": 600, "size_alpha": 1e15, "class_alpha": 1e15}


def digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.sort(idx).astype(np.int64).tobytes()).hexdigest()[:16]


def labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    return np.random.default_rng(seed).permutation(y)


@pytest.fixture(scope="module")
def fmnist_y() -> np.ndarray:
    if not (data_dir() / "fmnist" / "SHA256SUMS").is_file():
        pytest.skip(f"fmnist is not cached in {data_dir()} (run `fedbayes data fetch fmnist` to enable)")
    return load_dataset("fmnist").y_train


# ------------------------------------------------------------------------------------- the reference split


def test_non_iid_seed_62_matches_the_reference(fmnist_y: np.ndarray) -> None:
    parts = partition(fmnist_y, 10, "paper", seed=62, **PAPER)
    assert len(parts) == 10
    for k, (part, (n_k, counts, sha)) in enumerate(zip(parts, NON_IID, strict=True)):
        assert part.dtype == np.int64
        assert len(part) == n_k, k
        assert np.bincount(fmnist_y[part], minlength=10).tolist() == counts, k
        assert digest(part) == sha, k
    assert parts[0][:5].tolist() == NON_IID_HEAD
    assert sum(len(p) for p in parts) == 6009
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint


def test_client_order_is_the_reference_concatenation(fmnist_y: np.ndarray) -> None:
    """Not sorted: the slices of classes 0..9 one after the other (minibatches are cut from this order)."""
    for part in partition(fmnist_y, 10, "paper", seed=62, **PAPER):
        ys = fmnist_y[part]
        assert np.all(np.diff(ys) >= 0)  # class blocks in class order
    assert not np.all(np.diff(partition(fmnist_y, 10, "paper", seed=62, **PAPER)[2]) > 0)


def test_iid_seed_62_matches_the_reference(fmnist_y: np.ndarray) -> None:
    parts = partition(fmnist_y, 10, "paper", seed=62, **IID)
    assert [len(p) for p in parts] == [600] * 10
    assert all(np.bincount(fmnist_y[p], minlength=10).tolist() == [60] * 10 for p in parts)
    assert parts[0][:5].tolist() == IID_HEAD
    assert digest(parts[0]) == IID_HASH


def test_legacy_stream_is_numpys_global_one() -> None:
    """``RandomState(seed)`` draws what ``np.random.seed(seed)`` + the global functions draw (the reference)."""
    state = np.random.get_state()
    try:
        np.random.seed(62)
        p, q = np.random.dirichlet([1.0] * 10), np.random.dirichlet([0.5] * 10, 10)
        idx = np.arange(50)
        np.random.shuffle(idx)
    finally:
        np.random.set_state(state)
    rng = np.random.RandomState(62)
    assert np.array_equal(p, rng.dirichlet([1.0] * 10))
    assert np.array_equal(q, rng.dirichlet([0.5] * 10, 10))
    mine = np.arange(50)
    rng.shuffle(mine)
    assert np.array_equal(idx, mine)


# ------------------------------------------------------------------------------- the scheme on synthetic labels


def test_paper_counts_round_and_raise_ones_to_two() -> None:
    rng = np.random.RandomState(3)
    counts = paper_counts(np.full(10, 1000), 10, rng, size_alpha=1.0, class_alpha=0.5, per_class=100)
    assert counts.shape == (10, 10)
    assert not np.any(counts == 1)
    # same draws as written out by hand
    rng = np.random.RandomState(3)
    p, q = rng.dirichlet(np.ones(10)), rng.dirichlet(np.full(10, 0.5), 10)
    w = p[:, None] * q
    want = np.array([[round(100 * w[k, c] / w[:, c].sum()) for c in range(10)] for k in range(10)])
    want[want == 1] = 2
    assert np.array_equal(counts, want)


def test_paper_scheme_is_disjoint_reproducible_and_class_blocked() -> None:
    y = labels([300, 280, 310, 290, 305])
    a = partition(y, 6, "paper", seed=5, per_class=200)
    b = partition(y, 6, "paper", seed=5, per_class=200)
    c = partition(y, 6, "paper", seed=6, per_class=200)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    allidx = np.concatenate(a)
    assert len(np.unique(allidx)) == len(allidx)
    for part in a:
        assert np.all(np.diff(y[part]) >= 0)
    counts = np.array([np.bincount(y[p], minlength=5) for p in a])
    assert np.all(np.abs(counts.sum(axis=0) - 200) <= 6)  # rounding and the 1 -> 2 rule only


def test_paper_scheme_rejects_bad_requests() -> None:
    y = labels([50, 40, 60])
    with pytest.raises(ValueError, match="per_class"):
        partition(y, 3, "paper", seed=0, per_class=41)  # class 1 has only 40
    with pytest.raises(ValueError, match="per_class"):
        partition(y, 3, "paper", seed=0, per_class=0)
    with pytest.raises(ValueError, match="per_class"):
        partition(y, 20, "paper", seed=2, per_class=40)  # rounding (and 1 -> 2) needs 45 of class 1
    with pytest.raises(ValueError, match="class labels"):
        partition(np.linspace(0, 1, 100), 3, "paper", seed=0, per_class=10)
    with pytest.raises(ValueError, match="unknown parameter"):
        partition(y, 3, "paper", seed=0, per_class=10, min_size=2)


def test_pool_is_the_sorted_union() -> None:
    y = labels([300, 280, 310, 290, 305])
    parts = partition(y, 6, "paper", seed=5, per_class=200)
    pooled = pool(parts)
    assert np.array_equal(pooled, np.sort(np.concatenate(parts)))
    assert np.array_equal(pool(partition(y, 7, "dirichlet", seed=1)), np.arange(len(y)))
    with pytest.raises(ValueError, match="share"):
        pool([np.array([0, 1]), np.array([1, 2])])


# --------------------------------------------------------------------------------------------- run keys


def test_config_rejects_bad_combinations() -> None:
    with pytest.raises(ConfigError, match="train-fraction"):
        resolve({"dataset": "fmnist", "partition": "paper", "per-class": 600, "train-fraction": 0.1})
    with pytest.raises(ConfigError, match="per-class"):
        resolve({"dataset": "fmnist", "partition": "paper"})
    with pytest.raises(ConfigError, match="raw-pixels"):
        resolve({"dataset": "adult", "raw-pixels": True})
    with pytest.raises(ConfigError, match="raw-pixels"):
        resolve({"dataset": "synthetic-regression", "raw-pixels": "true"})
    with pytest.raises(ConfigError, match="pool-clients"):
        resolve({"dataset": "digits", "pool-clients": 10, "num-clients": 10})
    exp = resolve({"dataset": "fmnist", "partition": "paper", "per-class": "600", "raw-pixels": "true"})
    assert exp.run.per_class == 600 and exp.run.raw_pixels is True
    assert exp.to_flat()["per-class"] == 600 and exp.to_flat()["pool-clients"] == 0


def test_per_class_above_a_class_size_names_the_key() -> None:
    exp = resolve({"dataset": "digits", "partition": "paper", "per-class": 1000, "num-clients": 3})
    with pytest.raises(ConfigError, match="per-class"):
        client_parts(exp, load_dataset("digits"))


def test_pool_clients_gives_one_client_with_the_partitions_examples() -> None:
    data = load_dataset("digits")
    fed = resolve({"dataset": "digits", "partition": "paper", "per-class": 50, "num-clients": 4, "seed": 1})
    pooled = resolve({"dataset": "digits", "partition": "paper", "per-class": 50, "num-clients": 1,
                      "pool-clients": 4, "seed": 1})
    parts = client_parts(fed, data)
    (one,) = client_parts(pooled, data)
    assert np.array_equal(one, np.sort(np.concatenate(parts)))
    # dirichlet uses every example: pooling it is the old centralized split (one iid client)
    diri = resolve({"dataset": "digits", "num-clients": 1, "pool-clients": 5})
    old = resolve({"dataset": "digits", "num-clients": 1, "partition": "iid"})
    assert np.array_equal(client_parts(diri, data)[0], client_parts(old, data)[0])


def test_centralized_row_pools_the_presets_partition() -> None:
    preset = load_preset("fmnist-10-het-paper")
    cfg = resolve(centralized_config(preset, 62)).run
    assert (cfg.num_clients, cfg.pool_clients, cfg.partition, cfg.per_class) == (1, 10, "paper", 600)
    assert cfg.raw_pixels and cfg.train_fraction == 1.0 and cfg.algorithm == "fedavg"
    for algo in preset.algorithms:
        run = resolve(preset.config_for(algo)).run
        assert (run.partition, run.seed, run.raw_pixels, run.rounds) == ("paper", 62, True, 50)
    assert len(preset.algorithms) == 8
    iid = resolve(load_preset("fmnist-10-iid-paper").config_for("bayes-admm"))
    assert iid.run.size_alpha == iid.run.class_alpha == 1e15
    assert (iid.algo.prior_prec, iid.algo.rho) == (0.5, 0.1)  # type: ignore[attr-defined]


def test_centralized_paper_split_holds_exactly_the_clients_examples(fmnist_y: np.ndarray) -> None:
    preset = load_preset("fmnist-10-het-paper")
    data = load_dataset("fmnist")
    (one,) = client_parts(resolve(centralized_config(preset, 62)), data)
    parts = client_parts(resolve(preset.config_for("fedavg")), data)
    assert len(one) == 6009
    assert np.array_equal(one, np.sort(np.concatenate(parts)))


# ------------------------------------------------------------------------------------------------ raw pixels


def test_raw_pixels_digits_are_16x() -> None:
    a, b = load_dataset("digits"), load_dataset("digits", raw_pixels=True)
    assert np.array_equal(b.x_train / np.float32(16.0), a.x_train)
    assert np.array_equal(b.x_test / np.float32(16.0), a.x_test)
    assert b.x_train.max() == 16.0 and b.x_train.dtype == np.float32
    with pytest.raises(ValueError, match="raw_pixels"):
        load_dataset("breast-cancer", raw_pixels=True)


def test_raw_pixels_fmnist_are_255x(fmnist_y: np.ndarray) -> None:
    a, b = load_dataset("fmnist"), load_dataset("fmnist", raw_pixels=True)
    assert np.array_equal(b.x_train / np.float32(255.0), a.x_train)
    assert np.array_equal(b.x_test / np.float32(255.0), a.x_test)
    assert np.allclose(a.x_train * 255.0, b.x_train, rtol=0, atol=1e-4)
    assert b.x_train.max() == 255.0 and np.array_equal(b.x_train, np.round(b.x_train))
    assert np.array_equal(a.y_train, b.y_train)


def test_federation_build_uses_raw_pixels_and_the_paper_split(fmnist_y: np.ndarray) -> None:
    from fedbayes.federation import Federation

    exp = resolve({**load_preset("fmnist-10-het-paper").config_for("fedavg"), "hidden": "8"})
    fed = Federation.build(exp)
    assert [len(p) for p in fed.parts] == [n for n, _, _ in NON_IID]
    x0, y0 = fed.client_data[0]
    assert x0.shape == (30, 1, 28, 28) and float(x0.max()) > 1.0
    assert np.array_equal(x0.numpy()[:5], fed.data.x_train[NON_IID_HEAD])
    assert y0[:5].tolist() == fmnist_y[NON_IID_HEAD].tolist()
