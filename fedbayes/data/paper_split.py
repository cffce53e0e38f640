"""The ``paper`` partitioner: the reference implementation's own Fashion-MNIST split, draw for draw (see
:mod:`fedbayes.data.partition` and ``shared/reference/paper-split.md``)."""

from __future__ import annotations

import numpy as np

from fedbayes.data.split_utils import check_positive_float, is_regression

__all__ = ["paper_counts", "paper_partition"]


def paper_counts(
    class_sizes: np.ndarray,
    num_clients: int,
    rng: np.random.RandomState,
    *,
    size_alpha: float,
    class_alpha: float,
    per_class: int,
) -> np.ndarray:
    r"""The ``(num_clients, num_classes)`` example counts of :func:`paper_partition` (steps 1 and 3).

    Draws the size shares and class shares from ``rng`` (in that order) and returns
    :math:`n_{kc} = \mathrm{round}(P\, p_k q_{kc} / \sum_j p_j q_{jc})` with counts of 1 raised to 2.

    Raises
    ------
    ValueError
        If a class would need more examples than it has (``per_class`` too close to its size).
    """
    num_classes = len(class_sizes)
    shares = rng.dirichlet(np.full(num_clients, size_alpha))
    mixes = rng.dirichlet(np.full(num_classes, class_alpha), num_clients)
    weights = shares[:, None] * mixes  # (K, C)
    exact = per_class * weights / weights.sum(axis=0, keepdims=True)
    counts = np.rint(exact).astype(np.int64)  # round half to even, as Python's round()
    counts[counts == 1] = 2
    need = counts.sum(axis=0)
    short = np.flatnonzero(need > class_sizes)
    if len(short):
        c = int(short[0])
        raise ValueError(
            f"per_class={per_class} is too large: after rounding (and raising counts of 1 to 2) class {c} needs "
            f"{int(need[c])} examples but has {int(class_sizes[c])}"
        )
    return counts


def paper_partition(
    y: np.ndarray,
    num_clients: int,
    rng: np.random.RandomState,
    *,
    per_class: int,
    size_alpha: float = 1.0,
    class_alpha: float = 0.5,
) -> list[np.ndarray]:
    r"""The reference code's split, draw for draw: the papers' ``fashionmnist_10p_non_iid`` / ``_iid``.

    Reproduces the behaviour of ``data_generators.py`` of team-approx-bayes/bayes-admm (commit bd80f94,
    GPL; facts only, no code taken) on the full training file. With :math:`K` clients, classes
    :math:`c = 0, \dots, C-1` (the sorted labels) and :math:`P` = ``per_class``:

    1. Size shares :math:`p \sim \mathrm{Dir}(\alpha_s \mathbf{1}_K)`, then class shares
       :math:`q_k \sim \mathrm{Dir}(\alpha_c \mathbf{1}_C)` for :math:`k = 0, \dots, K-1` (one call,
       rows are clients), both from ``rng``.
    2. For each class :math:`c` in order: its indices in file order (``np.where(y == c)``), shuffled in
       place by ``rng.shuffle``.
    3. For each client :math:`k` in order: :math:`n_{kc} = \mathrm{round}(P\, p_k q_{kc} / \sum_j p_j q_{jc})`,
       and 2 where that gives 1; client :math:`k` takes the next :math:`n_{kc}` indices of the shuffled
       class.
    4. A client's examples are the concatenation of its slices over the classes, in that order (not
       sorted: a client's minibatches are cut from this order).

    The papers use ``rng = np.random.RandomState(62)`` (the stream of ``np.random.seed(62)``),
    :math:`K = 10`, :math:`P = 600` ("10p"), :math:`\alpha_s = 1, \alpha_c = 0.5` (non-iid: 6,009
    examples, client sizes 30 to 1,789) or :math:`\alpha_s = \alpha_c = 10^{15}` (iid: 600 examples per
    client, 60 per class). Because of the rounding and the 1-to-2 rule the total is only close to
    :math:`P C`; examples not taken are not assigned to anyone.

    Parameters
    ----------
    y
        Integer class labels of the whole training file, shape ``(N,)``.
    num_clients
        Number of clients :math:`K`.
    rng
        numpy's legacy generator (``np.random.RandomState(seed)``); the shares and shuffles are drawn from
        it in the order above.
    per_class
        Examples drawn from each class, in ``[1, min_c N_c]``.
    size_alpha, class_alpha
        Concentrations of the size and class-share Dirichlets, > 0.

    Raises
    ------
    ValueError
        Regression targets, a ``per_class`` out of range, or rounding that asks a class for more
        examples than it has.
    """
    if is_regression(y):
        raise ValueError("the 'paper' scheme needs class labels; use 'iid' or 'dirichlet' for regression")
    size_alpha = check_positive_float("size_alpha", size_alpha)
    class_alpha = check_positive_float("class_alpha", class_alpha)
    classes, y_idx = np.unique(y, return_inverse=True)
    class_sizes = np.bincount(y_idx, minlength=len(classes))
    if isinstance(per_class, bool) or not isinstance(per_class, int | np.integer) or not (
        1 <= per_class <= int(class_sizes.min())
    ):
        raise ValueError(
            f"per_class must be an integer in [1, {int(class_sizes.min())}] (the smallest class has "
            f"{int(class_sizes.min())} examples), got {per_class!r}"
        )
    counts = paper_counts(
        class_sizes, num_clients, rng, size_alpha=size_alpha, class_alpha=class_alpha, per_class=int(per_class)
    )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(len(classes)):
        idx = np.flatnonzero(y_idx == c)
        rng.shuffle(idx)
        start = 0
        for k in range(num_clients):
            parts[k].append(idx[start : start + counts[k, c]])
            start += int(counts[k, c])
    return [np.concatenate(p).astype(np.int64) for p in parts]
