"""Seeded partitioners that split a training set across federated clients.

Every partitioner maps the training labels ``y`` to a list of ``num_clients`` disjoint ``int64`` index
arrays into the training set. The same ``seed`` always gives the same partition. ``iid``, ``dirichlet`` and
``shards`` return each array sorted ascending and draw all randomness from one ``np.random.default_rng(seed)``;
``paper`` draws from numpy's legacy stream ``np.random.RandomState(seed)`` (the stream that
``np.random.seed(seed)`` gives the global functions) and keeps the reference code's example order, which
is what a client's minibatches are cut from.

Schemes (see :data:`PARTITIONERS`):

``iid``
    Shuffle, then split as equally as possible (sizes differ by at most one).
``dirichlet``
    The papers' heterogeneous split (bayes-admm ``data_generators.py``, "non_iid"): client sizes
    ~ Dir(``size_alpha`` = 1), class mix per client ~ Dir(``class_alpha`` = 0.5). Every example is used
    exactly once.
``shards``
    ``classes_per_client`` classes per client with ``per_class`` examples of each (the papers'
    "hetmnist": 100 clients x 2 classes x 300 examples).
``paper``
    The reference implementation's own Fashion-MNIST split, reproduced draw for draw (the public code of
    both papers, team-approx-bayes/bayes-admm, ``data_generators.py``, commit bd80f94, GPL; only its
    behaviour is reproduced here, no code is taken from it). Client sizes ~ Dir(``size_alpha``), class
    shares ~ Dir(``class_alpha``); ``per_class`` examples of each class are shared out in proportion,
    rounded per client (a count of 1 becomes 2), so the total is only close to ``per_class`` x classes
    (6,009 for the papers' seed-62 "10p" split, 6,000 for its iid variant with both alphas 1e15). It
    indexes the full training file, so it needs ``train-fraction = 1``. See :func:`paper_partition`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fedbayes.data.paper_split import paper_counts, paper_partition
from fedbayes.data.split_utils import (
    check_int,
    check_positive_float,
    finalise,
    is_regression,
    largest_remainder,
    split_by_counts,
)

__all__ = [
    "LEGACY_RNG", "PARTITIONERS", "Partitioner", "paper_counts", "paper_partition", "partition", "pool",
    "split_summary",
]

Partitioner = Callable[..., list[np.ndarray]]
"""``f(y, num_clients, rng, **params) -> list of int64 index arrays``."""


# ------------------------------------------------------------------------------------------------- iid


def iid_partition(y: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all indices and split them into ``num_clients`` nearly equal parts.

    Sizes differ by at most one (``np.array_split`` of a random permutation).
    """
    n = len(y)
    if num_clients > n:
        raise ValueError(f"num_clients must be in [1, {n}] (one example per client at least), got {num_clients}")
    return finalise(np.array_split(rng.permutation(n), num_clients))


# ------------------------------------------------------------------------------------------- dirichlet


def dirichlet_partition(
    y: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    size_alpha: float = 1.0,
    class_alpha: float = 0.5,
    min_size: int = 2,
) -> list[np.ndarray]:
    r"""Heterogeneous split with Dirichlet client sizes and Dirichlet class mixes.

    This is the "non_iid" split of the bayes-admm reference code (``data_generators.py``), written so
    that every example is used exactly once. With :math:`K` clients, :math:`C` classes, :math:`N`
    examples and :math:`N_c` examples of class :math:`c`:

    1. Size shares :math:`p \sim \mathrm{Dir}(\alpha_s \mathbf{1}_K)`; target sizes :math:`n_k = p_k N`.
    2. Class mixes :math:`q_k \sim \mathrm{Dir}(\alpha_c \mathbf{1}_C)`, one per client, drawn in client
       order after step 1.
    3. Unnormalised counts :math:`M_{kc} = n_k q_{kc}`, normalised per class so that column :math:`c`
       sums to :math:`N_c`: :math:`M_{kc} \leftarrow N_c M_{kc} / \sum_j M_{jc}` (a column that is
       numerically all zero uses the size shares :math:`p` instead).
    4. Each column is rounded to integers with the largest-remainder method, so it sums to exactly
       :math:`N_c`.
    5. Minimum size: while some client has fewer than ``min_size`` examples, one example is moved to the
       smallest such client from the currently largest client, taken from that client's most frequent
       class. (The reference code instead bumps any count of 1 to 2, which double-counts examples.)
    6. For each class the indices of that class are shuffled and cut into consecutive blocks of sizes
       :math:`M_{1c}, \dots, M_{Kc}`.

    A large ``class_alpha`` (e.g. 1e6) gives every client the global class mix; a small one (0.05) gives
    clients one or two dominant classes. A large ``size_alpha`` gives near-equal client sizes (the
    reference's "iid" uses :math:`\alpha = 10^{15}` for both). Because step 3 rescales each class
    separately, the final sizes follow the shares :math:`p` only when the class mixes are similar; with
    skewed mixes a client that is alone in wanting some class receives all of it, so sizes vary even for
    a large ``size_alpha`` (as in the reference).

    Regression targets (floating ``y``) have no classes: the split falls back to size skew only
    (steps 1 and 5 on a random permutation of all indices).

    Parameters
    ----------
    y
        Training labels (integers) or regression targets (floats), shape ``(N,)``.
    num_clients
        Number of clients :math:`K`, in ``[1, N // min_size]``.
    rng
        Random generator.
    size_alpha
        Concentration of the client-size Dirichlet, > 0.
    class_alpha
        Concentration of the per-client class-mix Dirichlet, > 0.
    min_size
        Minimum examples per client, >= 1.
    """
    size_alpha = check_positive_float("size_alpha", size_alpha)
    class_alpha = check_positive_float("class_alpha", class_alpha)
    min_size = check_int("min_size", min_size, 1)
    n = len(y)
    if num_clients * min_size > n:
        raise ValueError(
            f"num_clients must be in [1, {n // min_size}] for {n} examples with min_size={min_size}, got {num_clients}"
        )
    shares = rng.dirichlet(np.full(num_clients, size_alpha))
    if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # pragma: no cover - numerical guard
        shares = np.full(num_clients, 1.0 / num_clients)

    if is_regression(y):
        counts = largest_remainder(shares, n)[:, None]
        counts = _enforce_min_size(counts, min_size)
        return finalise(split_by_counts(rng.permutation(n), counts[:, 0]))

    classes, y_idx = np.unique(y, return_inverse=True)
    class_sizes = np.bincount(y_idx, minlength=len(classes))
    mixes = rng.dirichlet(np.full(len(classes), class_alpha), size=num_clients)
    raw = shares[:, None] * n * mixes  # (K, C)
    counts = np.zeros_like(raw, dtype=np.int64)
    for c, n_c in enumerate(class_sizes):
        col = raw[:, c]
        if not np.all(np.isfinite(col)) or col.sum() <= 0:
            col = shares
        counts[:, c] = largest_remainder(col, int(n_c))
    counts = _enforce_min_size(counts, min_size)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(len(classes)):
        idx_c = rng.permutation(np.flatnonzero(y_idx == c))
        for k, block in enumerate(split_by_counts(idx_c, counts[:, c])):
            parts[k].append(block)
    return finalise([np.concatenate(p) for p in parts])


def _enforce_min_size(counts: np.ndarray, min_size: int) -> np.ndarray:
    """Move single examples from the largest client to clients below ``min_size`` (see step 5)."""
    counts = counts.copy()
    sizes = counts.sum(axis=1)
    while sizes.min() < min_size:
        needy = int(np.argmin(sizes))
        donor = int(np.argmax(sizes))
        c = int(np.argmax(counts[donor]))
        counts[donor, c] -= 1
        counts[needy, c] += 1
        sizes[donor] -= 1
        sizes[needy] += 1
    return counts


# ---------------------------------------------------------------------------------------------- shards


def shards_partition(
    y: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    classes_per_client: int = 2,
    per_class: int | None = None,
    max_uses: int | None = None,
) -> list[np.ndarray]:
    """Pathological label skew: each client holds exactly ``classes_per_client`` classes.

    The papers' "hetmnist" split (100 clients x 2 classes x 300 examples). Procedure:

    1. Class capacities: a class may be given to at most ``cap_c = min(max_uses, N_c // per_class)``
       clients (``N_c`` when ``per_class`` is not given). ``max_uses`` defaults to the smallest value from
       ``ceil(num_clients * classes_per_client / num_classes)`` up (20 for the papers' 100 x 2 split of 10
       classes) with which all client-class slots fit.
    2. Clients pick classes in order. The first class is the least-assigned class so far (among those
       with capacity left; ties at random), the others are drawn uniformly at random from the remaining
       classes with capacity left. If a random draw would leave the later clients unable to get
       ``classes_per_client`` distinct classes, the client takes the classes with the most capacity left
       instead (this keeps the assignment always completable).
    3. ``per_class`` defaults to the largest count that fits: ``min_c N_c // uses_c`` over the used
       classes.
    4. For each class the indices are shuffled and consecutive blocks of ``per_class`` go to the clients
       that use it. Examples left over are not assigned to anyone.

    Raises
    ------
    ValueError
        If ``y`` holds regression targets, ``classes_per_client`` exceeds the number of classes,
        ``num_clients`` exceeds the number of examples, or the capacities cannot fit
        ``num_clients * classes_per_client`` class slots.
    """
    if is_regression(y):
        raise ValueError("the 'shards' scheme needs class labels; use 'iid' or 'dirichlet' for regression")
    classes, y_idx = np.unique(y, return_inverse=True)
    num_classes = len(classes)
    class_sizes = np.bincount(y_idx, minlength=num_classes)
    n = len(y)
    k = check_int("classes_per_client", classes_per_client, 1, num_classes)
    if num_clients * k > n:
        raise ValueError(
            f"num_clients must be in [1, {n // k}] for {n} examples with classes_per_client={k}, got {num_clients}"
        )
    if per_class is not None:
        per_class = check_int("per_class", per_class, 1, int(class_sizes.max()))
    if max_uses is not None:
        max_uses = check_int("max_uses", max_uses, 1, num_clients)
    slots = num_clients * k

    if per_class is not None:
        size_cap = class_sizes // per_class
    else:
        size_cap = class_sizes  # each use needs at least one example
    if max_uses is None:
        # Smallest common cap from the balanced ceil(slots / C) upwards that fits all slots.
        max_uses = math.ceil(slots / num_classes)
        while max_uses < num_clients and int(np.minimum(size_cap, max_uses).sum()) < slots:
            max_uses += 1
    cap = np.minimum(size_cap, min(max_uses, num_clients)).astype(np.int64)
    # Feasible iff sum_c min(cap_c, K) >= K * k (max-flow/min-cut with equal client demands).
    if int(cap.sum()) < slots:
        hint = "lower num_clients or classes_per_client"
        if per_class is not None:
            fits = [
                p for p in range(per_class - 1, 0, -1) if int(np.minimum(class_sizes // p, max_uses).sum()) >= slots
            ]
            hint = f"lower per_class (at most {fits[0]} fits)" if fits else hint
        raise ValueError(
            f"cannot give {num_clients} clients {k} classes each: the classes can take at most "
            f"{int(cap.sum())} of the {slots} client-class slots (per_class={per_class}, "
            f"max_uses={max_uses}, class sizes {class_sizes.tolist()}); {hint}"
        )

    uses = np.zeros(num_classes, dtype=np.int64)
    chosen: list[np.ndarray] = []
    for i in range(num_clients):
        remaining_clients = num_clients - i - 1
        left = cap - uses
        avail = np.flatnonzero(left > 0)
        least = avail[uses[avail] == uses[avail].min()]
        first = int(rng.choice(least))
        others = avail[avail != first]
        pick = np.concatenate([[first], rng.choice(others, size=k - 1, replace=False)]).astype(np.int64)
        after = left.copy()
        after[pick] -= 1
        if int(np.minimum(after, remaining_clients).sum()) < remaining_clients * k:
            # Fall back to the classes with the most capacity left (random tie-break).
            order = np.lexsort((rng.random(num_classes), -left))
            pick = order[:k].astype(np.int64)
        uses[pick] += 1
        chosen.append(pick)

    if per_class is None:
        used = uses > 0
        per_class = int((class_sizes[used] // uses[used]).min())

    pools = [rng.permutation(np.flatnonzero(y_idx == c)) for c in range(num_classes)]
    offset = np.zeros(num_classes, dtype=np.int64)
    parts: list[np.ndarray] = []
    for pick in chosen:
        blocks = []
        for c in pick:
            blocks.append(pools[c][offset[c] : offset[c] + per_class])
            offset[c] += per_class
        parts.append(np.concatenate(blocks))
    return finalise(parts)


# -------------------------------------------------------------------------------------------- registry

PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
    "paper": paper_partition,
}
"""Partitioners by scheme name; each is ``f(y, num_clients, rng, **params)``."""

LEGACY_RNG = frozenset({"paper"})
"""Schemes that draw from ``np.random.RandomState(seed)`` (numpy's legacy stream) instead of
``np.random.default_rng(seed)``, and keep their own example order (their index arrays are not sorted)."""

_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("size_alpha", "class_alpha", "min_size"),
    "shards": ("classes_per_client", "per_class", "max_uses"),
    "paper": ("size_alpha", "class_alpha", "per_class"),
}


def partition(y: np.ndarray, num_clients: int, scheme: str, *, seed: int, **params: Any) -> list[np.ndarray]:
    """Split the training set described by ``y`` across ``num_clients`` clients.

    Parameters
    ----------
    y
        Training labels (integers) or regression targets (floats), shape ``(N,)``.
    num_clients
        Number of clients, >= 1.
    scheme
        One of :data:`PARTITIONERS` (``"iid"``, ``"dirichlet"``, ``"shards"``, ``"paper"``).
    seed
        Seed of ``np.random.default_rng`` (``np.random.RandomState`` for the schemes in
        :data:`LEGACY_RNG`); the same seed gives the same partition.
    **params
        Scheme parameters (see :func:`dirichlet_partition`, :func:`shards_partition`,
        :func:`paper_partition`).

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` disjoint ``int64`` index arrays into the training set; sorted ascending except for
        the schemes in :data:`LEGACY_RNG`, which keep their own order.

    Raises
    ------
    ValueError
        Unknown scheme, unknown or out-of-range parameter, or an impossible request.
    """
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITIONERS)}")
    unknown = sorted(set(params) - set(_PARAMS[scheme]))
    if unknown:
        valid = ", ".join(_PARAMS[scheme]) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for scheme {scheme!r}; valid: {valid}")
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("y is empty: nothing to partition")
    num_clients = check_int("num_clients", num_clients, 1)
    rng: np.random.Generator | np.random.RandomState
    rng = np.random.RandomState(seed) if scheme in LEGACY_RNG else np.random.default_rng(seed)
    return PARTITIONERS[scheme](y, num_clients, rng, **params)


def split_summary(parts: list[np.ndarray], y: np.ndarray) -> str:
    """One line describing a partition: client count, sizes and classes per client (min/median/max).

    For regression targets (floating ``y``) the class part is omitted.
    """
    y = np.asarray(y)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)

    def mmm(a: np.ndarray) -> str:
        return f"{int(a.min())}/{float(np.median(a)):g}/{int(a.max())}" if len(a) else "-/-/-"

    line = f"{len(parts)} clients, {int(sizes.sum())} examples; size min/median/max {mmm(sizes)}"
    if not is_regression(y):
        ncls = np.array([len(np.unique(y[p])) for p in parts], dtype=np.int64)
        line += f"; classes per client min/median/max {mmm(ncls)}"
    return line


def pool(parts: list[np.ndarray]) -> np.ndarray:
    """The union of all clients' examples as one sorted ``int64`` index array (the pooled-data baseline).

    Sorted, so that pooling a partition that uses every example (``iid``, ``dirichlet``) gives exactly the
    one-client ``iid`` split of the same training set.

    Raises
    ------
    ValueError
        If the parts are not disjoint (an example would be counted twice).
    """
    idx = np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
    if len(idx) > 1 and bool(np.any(idx[1:] == idx[:-1])):
        raise ValueError("cannot pool a partition whose clients share examples")
    return idx
