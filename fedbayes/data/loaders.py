"""The loaders of each dataset (preprocessing: :mod:`fedbayes.data.datasets`) and the stratified splits they use."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = [
    "ADULT_CATEGORICAL",
    "ADULT_COLUMNS",
    "ADULT_NUMERIC",
    "Arrays",
    "encode_adult",
    "load_adult",
    "load_breast_cancer",
    "load_digits",
    "load_idx_cache",
    "read_adult_csv",
    "stratified_split",
    "stratified_subset",
    "synthetic_classification",
    "synthetic_regression",
]

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------- helpers


def stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), keeping class proportions; returns sorted index arrays."""
    test_parts = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_parts.append(idx[: round(test_fraction * len(idx))])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def stratified_subset(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random ``fraction`` of ``y``, keeping class proportions.

    The total is ``max(1, round(fraction * N))``; it is shared among the classes by the largest-remainder
    method. Floating ``y`` (regression) gives a plain random subset.
    """
    n = len(y)
    total = max(1, round(fraction * n))
    if np.issubdtype(y.dtype, np.floating):
        return np.sort(rng.permutation(n)[:total])
    classes, inv = np.unique(y, return_inverse=True)
    sizes = np.bincount(inv, minlength=len(classes))
    exact = sizes * (total / n)
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: total - int(quota.sum())]] += 1
    picks = [rng.permutation(np.flatnonzero(inv == c))[: quota[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picks))


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------- loaders


def load_idx_cache(folder: Path, seed: int) -> Arrays:
    """fmnist / mnist: ``train.npz`` and ``test.npz`` with uint8 ``x`` (N, 28, 28) and uint8 ``y``.

    Returns the raw pixel values 0-255 as flat ``uint8`` rows: :func:`load_dataset` converts only the rows it
    keeps to ``float32`` (converting all 60,000 training images first cost ~2-5 s of every run's start-up, most of
    it spent allocating 188 MB, for the 10 % the fmnist presets keep).
    """
    out = []
    for split in ("train", "test"):
        with np.load(folder / f"{split}.npz", allow_pickle=False) as z:
            x, y = z["x"], z["y"]
        out += [x.reshape(len(x), -1), y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
    "income",
)  # fmt: skip
ADULT_NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
ADULT_CATEGORICAL = tuple(c for c in ADULT_COLUMNS[:-1] if c not in ADULT_NUMERIC)


def read_adult_csv(path: Path, *, skip_first: bool = False) -> list[list[str]]:
    """Rows of a UCI Adult file (``adult.data`` / ``adult.test``), fields stripped, blank lines dropped.

    ``skip_first`` skips the ``|1x3 Cross validator`` line that opens ``adult.test``; the trailing ``.`` of
    the test labels (``>50K.``) is removed.
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        if skip_first:
            next(reader, None)
        for row in reader:
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) != len(ADULT_COLUMNS):
                raise ValueError(f"{path}: expected {len(ADULT_COLUMNS)} fields, got {len(row)}: {row}")
            fields = [f.strip() for f in row]
            fields[-1] = fields[-1].rstrip(".")
            rows.append(fields)
    return rows


def encode_adult(train_rows: list[list[str]], test_rows: list[list[str]]) -> Arrays:
    """One-hot categoricals (train categories, ``?`` kept) + standardised numerics (train statistics)."""
    col = {c: i for i, c in enumerate(ADULT_COLUMNS)}
    tr, te = np.array(train_rows, dtype=object), np.array(test_rows, dtype=object)

    def numeric(a: np.ndarray) -> np.ndarray:
        return np.array(a[:, [col[c] for c in ADULT_NUMERIC]], dtype=np.float64)

    num_tr, num_te = _standardise(numeric(tr), numeric(te))
    blocks_tr, blocks_te = [num_tr], [num_te]
    for c in ADULT_CATEGORICAL:
        cats = sorted(set(tr[:, col[c]]))
        lookup = {v: i for i, v in enumerate(cats)}
        for a, blocks in ((tr, blocks_tr), (te, blocks_te)):
            codes = np.array([lookup.get(v, -1) for v in a[:, col[c]]], dtype=np.int64)
            onehot = np.zeros((len(a), len(cats)), dtype=np.float32)
            seen = codes >= 0
            onehot[np.flatnonzero(seen), codes[seen]] = 1.0
            blocks.append(onehot)

    def label(a: np.ndarray) -> np.ndarray:
        lab = a[:, col["income"]]
        bad = set(lab) - {">50K", "<=50K"}
        if bad:
            raise ValueError(f"unexpected Adult labels: {sorted(bad)}")
        return (lab == ">50K").astype(np.int64)

    return np.hstack(blocks_tr), label(tr), np.hstack(blocks_te), label(te)


def load_adult(folder: Path, seed: int) -> Arrays:
    return encode_adult(read_adult_csv(folder / "adult.data"), read_adult_csv(folder / "adult.test", skip_first=True))


def load_digits(folder: Path, seed: int) -> Arrays:
    from sklearn.datasets import load_digits  # reads sklearn/datasets/data/digits.csv.gz

    bunch = load_digits()
    x, y = np.asarray(bunch.data, dtype=np.float32), np.asarray(bunch.target, np.int64)  # counts 0-16
    tr, te = stratified_split(y, 0.2, np.random.default_rng(0))
    return x[tr], y[tr], x[te], y[te]


def load_breast_cancer(folder: Path, seed: int) -> Arrays:
    from sklearn.datasets import load_breast_cancer  # reads sklearn/datasets/data/breast_cancer.csv

    bunch = load_breast_cancer()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, np.int64)
    tr, te = stratified_split(y, 0.2, np.random.default_rng(0))
    x_tr, x_te = _standardise(x[tr], x[te])
    return x_tr, y[tr], x_te, y[te]


SYNTH_TRAIN, SYNTH_TEST = 2000, 500


def synthetic_regression(folder: Path, seed: int) -> Arrays:
    """Linear model ``y = X w + 0.5 * eps``, ``X, w, eps ~ N(0, 1)``, 10 features."""
    rng = np.random.default_rng(seed)
    n, d = SYNTH_TRAIN + SYNTH_TEST, 10
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = x @ w + 0.5 * rng.standard_normal(n)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    return x32[:SYNTH_TRAIN], y32[:SYNTH_TRAIN], x32[SYNTH_TRAIN:], y32[SYNTH_TRAIN:]


def synthetic_classification(folder: Path, seed: int) -> Arrays:
    """Gaussian mixture: 10 balanced classes in 20 dimensions, means ~ N(0, 0.5^2 I), unit covariance."""
    rng = np.random.default_rng(seed)
    c, d = 10, 20
    means = 0.5 * rng.standard_normal((c, d))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % c).astype(np.int64)
        return (means[y] + rng.standard_normal((n, d))).astype(np.float32), y

    x_tr, y_tr = sample(SYNTH_TRAIN)
    x_te, y_te = sample(SYNTH_TEST)
    return x_tr, y_tr, x_te, y_te
