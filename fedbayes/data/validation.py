"""The validation split (run keys ``validation-fraction`` and ``eval-split``), used for fair tuning.

The rule
--------
With ``validation-fraction`` = f > 0, the validation set is a stratified sample, seeded by the run's ``seed``,
of size round(f · n) (0 < f ≤ 1), n = the number of training examples the clients hold, drawn from the examples of the
**training file that no client holds**: those ``train-fraction`` < 1 left out (Fashion-MNIST with
``train-fraction = 0.1`` leaves 54,000) and those the partition did not hand out (``partition = "paper"`` uses
about 6,000 of 60,000).  The clients' data is then exactly what it is without a validation set, so tuning runs
and final runs train on the same examples.  Only when fewer unused examples exist than that (a partition that
uses every example with ``train-fraction = 1``, e.g. adult or digits with ``dirichlet``) is the validation set
held out of the training set before partitioning instead: round(f · N) examples of the N training examples,
and the clients are partitioned from the remaining N − round(f · N) (this needs f < 0.5).  The test set is
never touched.

The split is identified by its rows in the training file: :meth:`ValidationSet.fingerprint` is the first 16
hex digits of the SHA-256 of the sorted rows (``split.json`` in the run folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedbayes.data.datasets import Dataset

__all__ = ["VALIDATION_STREAM", "ValidationSet", "split_validation", "stratified_sample"]

VALIDATION_STREAM = 0x7A11D
"""Second word of the validation draw's seed ``[seed, VALIDATION_STREAM]``: independent of the training subset
(``default_rng(seed)``) and of the partition."""


@dataclass(frozen=True, eq=False)
class ValidationSet:
    """The validation examples and where they came from.

    Attributes
    ----------
    x, y
        Features and labels, in the order of ``rows``.
    rows
        Their rows in the training file, ascending.
    source
        ``"unused"`` (training-file examples no client holds) or ``"held-out"`` (held out of the training set
        before partitioning, because too few unused examples exist).
    fraction
        ``validation-fraction``.
    num_client_examples
        Examples the clients hold (after a hold-out, if any).
    num_unused
        Training-file examples no client holds (excluding the validation set's own when held out).
    """

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    source: Literal["unused", "held-out"]
    fraction: float
    num_client_examples: int
    num_unused: int

    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of the sorted training-file rows (little-endian int64)."""
        return hashlib.sha256(np.sort(self.rows).astype("<i8").tobytes()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """What ``split.json`` records."""
        return {
            "validation-fraction": self.fraction,
            "source": self.source,
            "num-validation": len(self.rows),
            "num-client-examples": self.num_client_examples,
            "num-unused": self.num_unused,
            "rows": "training-file rows",
            "sha256-16": self.fingerprint(),
        }


def stratified_sample(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``size`` entries of ``y``, keeping class proportions (largest-remainder quotas);
    floating ``y`` (regression) gives a plain random sample."""
    n = len(y)
    if not 0 <= size <= n:
        raise ValueError(f"cannot sample {size} of {n} examples")
    if np.issubdtype(y.dtype, np.floating):
        return np.sort(rng.permutation(n)[:size])
    classes, inv = np.unique(y, return_inverse=True)
    counts = np.bincount(inv, minlength=len(classes))
    exact = counts * (size / n) if n else counts.astype(float)
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: size - int(quota.sum())]] += 1
    picks = [rng.permutation(np.flatnonzero(inv == c))[: quota[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def _size(fraction: float, n: int) -> int:
    return max(1, round(fraction * n))


def split_validation(
    data: Dataset,
    parts: list[np.ndarray],
    fraction: float,
    seed: int,
    repartition: Callable[[Dataset], list[np.ndarray]],
) -> tuple[Dataset, list[np.ndarray], ValidationSet]:
    """Apply the rule of this module.

    Parameters
    ----------
    data
        The loaded dataset; ``x_rest``/``y_rest``/``rest_index`` set (``load_dataset(..., keep_rest=True)``)
        when ``train-fraction`` < 1, else only the partition's leftovers count as unused.
    parts
        The clients' index arrays into ``data``'s training set.
    fraction
        ``validation-fraction`` in (0, 1]; a hold-out (too few unused examples) needs it below 0.5.
    seed
        The run's seed (the draw uses ``[seed, VALIDATION_STREAM]``).
    repartition
        Partitions a reduced training set (only called for a hold-out).

    Returns
    -------
    tuple
        The dataset the clients use (without the ``*_rest`` arrays; after a hold-out, without the held-out
        examples), its partition, and the validation set.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"validation-fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng([int(seed), VALIDATION_STREAM])
    rows = data.train_rows()
    held = np.zeros(len(rows), dtype=bool)
    for p in parts:
        held[p] = True
    n_held = int(held.sum())
    want = _size(fraction, n_held)
    free = np.flatnonzero(~held)
    pool_rows = rows[free]
    pool_y = data.y_train[free]
    if data.rest_index is not None and data.y_rest is not None:
        pool_rows = np.concatenate([pool_rows, data.rest_index])
        pool_y = np.concatenate([pool_y, data.y_rest])
    order = np.argsort(pool_rows, kind="stable")  # the draw depends on the pool's rows, not on how it was built
    pool_rows, pool_y = pool_rows[order], pool_y[order]
    clean = dataclasses.replace(data, x_rest=None, y_rest=None, rest_index=None)
    if len(pool_rows) >= want:
        pick = stratified_sample(pool_y, want, rng)
        chosen = pool_rows[pick]
        x_val = _rows_x(data, chosen)
        val = ValidationSet(x_val, pool_y[pick], chosen, "unused", fraction, n_held, len(pool_rows))
        return clean, parts, val
    # too few unused examples: hold round(f·N) out of the training set, then partition the rest
    if fraction >= 0.5:
        raise ValueError(
            f"validation-fraction {fraction} needs {want} unused training examples but only {len(pool_rows)} exist; "
            "holding the validation set out of the training set instead needs validation-fraction < 0.5")
    n = len(rows)
    pick = stratified_sample(data.y_train, _size(fraction, n), rng)
    keep = np.setdiff1d(np.arange(n), pick)
    reduced = dataclasses.replace(clean, x_train=np.ascontiguousarray(data.x_train[keep]), y_train=data.y_train[keep],
                                  train_index=rows[keep])
    new_parts = repartition(reduced)
    in_parts = np.zeros(len(keep), dtype=bool)
    for p in new_parts:
        in_parts[p] = True
    rest = 0 if data.rest_index is None else len(data.rest_index)
    val = ValidationSet(np.ascontiguousarray(data.x_train[pick]), data.y_train[pick], rows[pick], "held-out",
                        fraction, int(in_parts.sum()), int((~in_parts).sum()) + rest)
    return reduced, new_parts, val


def _rows_x(data: Dataset, chosen: np.ndarray) -> np.ndarray:
    """Features of training-file rows ``chosen`` (sorted), looked up in the training set and the rest."""
    rows = data.train_rows()
    out = np.empty((len(chosen), *data.input_shape), dtype=np.float32)
    sorter = np.argsort(rows, kind="stable")
    at = np.searchsorted(rows, chosen, sorter=sorter)
    pos = sorter[np.minimum(at, len(rows) - 1)] if len(rows) else np.zeros(len(chosen), np.int64)
    in_train = (at < len(rows)) & (rows[pos] == chosen) if len(rows) else np.zeros(len(chosen), bool)
    out[in_train] = data.x_train[pos[in_train]]
    if (~in_train).any():
        if data.rest_index is None or data.x_rest is None:
            raise ValueError("validation rows outside the training set but no x_rest")
        rpos = np.searchsorted(data.rest_index, chosen[~in_train])
        out[~in_train] = data.x_rest[rpos]
    return out
