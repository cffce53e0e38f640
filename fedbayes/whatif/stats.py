"""Small statistics for what-if reports: the diagonal-Gaussian KL, Spearman's rank correlation, metric deltas."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedbayes.gaussian import DiagGaussian, check_same_layout

__all__ = ["deltas", "influence_stats", "kl_diag", "rankdata", "spearman"]


def kl_diag(q: DiagGaussian, p: DiagGaussian) -> float:
    r"""KL(q ‖ p) of two diagonal Gaussians, in nats (float64).

    .. math:: \mathrm{KL} = \tfrac12 \sum_i \left[ \frac{s_{p,i}}{s_{q,i}} + s_{p,i}(m_{q,i} - m_{p,i})^2 - 1
              + \log\frac{s_{q,i}}{s_{p,i}} \right]

    with precisions s and means m; both must be proper (precision > 0).
    """
    check_same_layout(q.eta, p.eta, "kl_diag")
    mq, mp = q.to(dtype=torch.float64).mean(), p.to(dtype=torch.float64).mean()
    total = 0.0
    for k in mq:
        sq, sp = q.prec[k].double(), p.prec[k].double()
        r = sp / sq
        total += float(0.5 * (r + sp * (mq[k] - mp[k]) ** 2 - 1.0 - torch.log(r)).sum())
    return total


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their average rank (as ``scipy.stats.rankdata(method='average')``)."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (average-tie) ranks; NaN if one is constant."""
    a, b = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {a.size} and {b.size}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def deltas(new: Mapping[str, float], old: Mapping[str, float]) -> dict[str, float]:
    """new − old for every metric present in both."""
    return {k: float(new[k]) - float(old[k]) for k in new if k in old}


def influence_stats(pred: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation, Pearson correlation and mean absolute error of predicted vs actual."""
    p, a = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    pearson = float(np.corrcoef(p, a)[0, 1]) if p.std() > 0 and a.std() > 0 else math.nan
    return {"spearman": spearman(p, a), "pearson": pearson, "mae": float(np.abs(p - a).mean()),
            "mean_abs_actual": float(np.abs(a).mean())}
