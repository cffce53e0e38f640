"""The wire format (DESIGN §4) without Flower: what a server sends a client and what comes back.

Records are ``{record_name: {parameter_name: ndarray}}`` plus a flat config/metrics dict; ``server/`` and
``client/`` wrap them into Flower ``ArrayRecord``/``ConfigRecord``/``MetricRecord``, and the in-process
engine passes them as they are — so both engines run the same bytes through the same code.

Down (train):  ``prior.eta``, ``prior.prec`` (and optionally ``start.mean``, ``start.prec``), float32;
               config: the local settings in kebab-case (``LocalSettings.to_wire``), plus ``reply``
               ("site" | "mean"), ``round``, ``partition-id``.
Up:            ``site.eta``, ``site.prec`` when the local trainer formed a site (IVON, Laplace), else ``mean``;
               metrics with ``num-examples``, ``train-loss``, ``train-seconds``, ``steps``.

Every reply is validated by :func:`decode_reply` before it may touch server state: record keys, parameter
names and order, shapes, float dtype, finiteness, magnitudes, precision ≥ 0 and ``num-examples``.  A bad reply
raises :class:`InvalidReply` with the reason; the caller drops it and the round goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from fedbayes.algorithms.base import ClientTask, ClientUpdate
from fedbayes.gaussian import DiagGaussian
from fedbayes.keys import kebab
from fedbayes.local import LocalResult, LocalSettings, train_local

__all__ = [
    "MAX_ABS",
    "InvalidReply",
    "Records",
    "decode_job",
    "decode_reply",
    "decode_task",
    "encode_result",
    "encode_task",
    "execute",
    "nbytes",
]

Records = dict[str, dict[str, np.ndarray]]
MAX_ABS = 1e30
"""Largest magnitude accepted in a reply (float32 overflows at 3.4e38; beyond this a reply is hostile)."""
WIRE_DTYPE = np.float32


class InvalidReply(ValueError):
    """A client reply that failed validation; the message says why."""


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().astype(WIRE_DTYPE)


def encode_task(task: ClientTask) -> Records:
    rec: Records = {
        "prior.eta": {k: _np(v) for k, v in task.prior.eta.items()},
        "prior.prec": {k: _np(v) for k, v in task.prior.prec.items()},
    }
    if task.start_mean is not None:
        rec["start.mean"] = {k: _np(v) for k, v in task.start_mean.items()}
    if task.start_prec is not None:
        rec["start.prec"] = {k: _np(v) for k, v in task.start_prec.items()}
    return rec


def _check_arrays(rec: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    if list(rec) != list(shapes):
        missing = [k for k in shapes if k not in rec]
        extra = [k for k in rec if k not in shapes]
        raise InvalidReply(f"{what}: parameter names differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, arr in rec.items():
        if not isinstance(arr, np.ndarray):
            raise InvalidReply(f"{what}: '{k}' is not an array")
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
            raise InvalidReply(f"{what}: '{k}' has dtype {arr.dtype}, expected a float")
        if tuple(arr.shape) != tuple(shapes[k]):
            raise InvalidReply(f"{what}: '{k}' has shape {tuple(arr.shape)}, expected {tuple(shapes[k])}")
        if not np.isfinite(arr).all():
            raise InvalidReply(f"{what}: '{k}' has NaN or Inf")
        if arr.size and float(np.abs(arr).max()) > MAX_ABS:
            raise InvalidReply(f"{what}: '{k}' has absurd magnitude {float(np.abs(arr).max()):.3g}")


def _tensors(rec: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in rec.items()}


def decode_task(records: Mapping[str, Mapping[str, np.ndarray]], shapes: Mapping[str, tuple[int, ...]]) -> ClientTask:
    """Client side: check and decode a train message (``ValueError`` naming the problem)."""
    for key in ("prior.eta", "prior.prec"):
        if key not in records:
            raise ValueError(f"train message lacks record '{key}' (has {sorted(records)})")
    for key, rec in records.items():
        if key not in ("prior.eta", "prior.prec", "start.mean", "start.prec"):
            continue
        try:
            _check_arrays(rec, shapes, f"train message '{key}'")
        except InvalidReply as e:
            raise ValueError(str(e)) from None
    prior = DiagGaussian(_tensors(records["prior.eta"]), _tensors(records["prior.prec"]))
    start_mean = _tensors(records["start.mean"]) if "start.mean" in records else None
    start_prec = _tensors(records["start.prec"]) if "start.prec" in records else None
    return ClientTask(prior=prior, start_mean=start_mean, start_prec=start_prec)


def encode_result(res: LocalResult, reply: str = "mean") -> tuple[Records, dict[str, float | int]]:
    """``reply="site"``: the site (its mean is implied by prior + site); ``"mean"``: the local mean."""
    rec: Records = {}
    if reply == "mean":
        rec["mean"] = {k: _np(v) for k, v in res.mean.items()}
    elif reply == "site":
        if res.site is None:
            raise ValueError("reply 'site' requested but the local mode formed no site (use ivon or laplace)")
        rec["site.eta"] = {k: _np(v) for k, v in res.site.eta.items()}
        rec["site.prec"] = {k: _np(v) for k, v in res.site.prec.items()}
    metrics: dict[str, float | int] = {"num-examples": int(res.num_examples)}
    metrics.update({kebab(k): float(v) for k, v in res.metrics.items()})
    return rec, metrics


def decode_reply(
    records: Mapping[str, Mapping[str, np.ndarray]],
    metrics: Mapping[str, Any],
    *,
    client: int,
    shapes: Mapping[str, tuple[int, ...]],
    need_site: bool,
    expected_examples: int | None = None,
    max_examples: int = 10**9,
    prior_prec: Mapping[str, Any] | None = None,
) -> ClientUpdate:
    """Server side: validate a reply and turn it into a :class:`ClientUpdate` (float32 tensors where the wire held
    float32, else float64).

    ``prior_prec`` (the precision of the prior sent to this client) is given for rules with signed sites
    (``Algorithm.signed_sites``): a site precision may then be negative as long as prior + site > 0; without it
    every site precision must be ≥ 0.

    Raises
    ------
    InvalidReply
        With a reason naming the record, parameter and problem.
    """
    allowed = {"mean", "site.eta", "site.prec"}
    extra = sorted(set(records) - allowed)
    if extra:
        raise InvalidReply(f"unexpected records {extra}")
    if not need_site and "mean" not in records:
        raise InvalidReply("reply lacks record 'mean'")
    if need_site and not ("site.eta" in records and "site.prec" in records):
        raise InvalidReply("reply lacks records 'site.eta'/'site.prec'")
    if ("site.eta" in records) != ("site.prec" in records):
        raise InvalidReply("reply has only one of 'site.eta'/'site.prec'")
    for key, rec in records.items():
        _check_arrays(rec, shapes, f"record '{key}'")
    sent = prior_prec
    if "site.prec" in records and sent is None:
        for k, arr in records["site.prec"].items():
            if float(arr.min(initial=0.0)) < 0:
                raise InvalidReply(f"record 'site.prec': '{k}' has negative precision {float(arr.min()):.3g}")
    elif "site.prec" in records and sent is not None:  # a signed site: the posterior it implies must be proper
        for k, arr in records["site.prec"].items():
            post = np.asarray(arr).astype(np.float64) + np.asarray(sent[k]).astype(np.float64)
            if post.size and float(post.min()) <= 0:
                raise InvalidReply(f"record 'site.prec': '{k}' implies a posterior precision {float(post.min()):.3g}"
                                   " <= 0 (prior + site)")
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(float(n)) or float(n) != int(n):
        raise InvalidReply(f"num-examples must be a whole number, got {n!r}")
    n = int(n)
    if not 1 <= n <= max_examples:
        raise InvalidReply(f"num-examples {n} out of range [1, {max_examples}]")
    if expected_examples is not None and n != expected_examples:
        raise InvalidReply(f"num-examples {n} != {expected_examples} expected for client {client}")

    def t64(rec: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
        # float32 on the wire stays float32 (lossless, and half the memory of a round's replies: 1,000 sites of the
        # paper's MLP are 1.4 GB); the rules cast to float64 where they compute
        out = {}
        for k, v in rec.items():
            a = np.asarray(v)
            out[k] = torch.from_numpy(a.astype(np.float32 if a.dtype == np.float32 else np.float64, copy=True))
        return out

    site = None
    if "site.eta" in records:
        site = DiagGaussian(t64(records["site.eta"]), t64(records["site.prec"]))
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)):
            clean[k] = float(v)
    mean = t64(records["mean"]) if "mean" in records else None
    return ClientUpdate(client=client, num_examples=n, mean=mean, site=site, metrics=clean)


def nbytes(records: Mapping[str, Mapping[str, np.ndarray]]) -> int:
    return int(sum(a.nbytes for rec in records.values() for a in rec.values()))


def decode_job(
    shapes: Mapping[str, tuple[int, ...]],
    records: Mapping[str, Mapping[str, np.ndarray]],
    config: Mapping[str, Any],
    device: str | None = None,
) -> tuple[ClientTask, LocalSettings, str]:
    """A client's message as the trainer takes it: the task, the local settings and the reply kind (``"mean"``
    or ``"site"``); ``ValueError`` naming what is wrong."""
    task = decode_task(records, shapes)
    settings = LocalSettings.from_wire(config, device=device)
    reply = str(config.get("reply", "mean"))
    if reply not in ("mean", "site"):
        raise ValueError(f"config 'reply' must be 'mean' or 'site', got {reply!r}")
    return task, settings, reply


def execute(
    model: nn.Module,
    records: Mapping[str, Mapping[str, np.ndarray]],
    config: Mapping[str, Any],
    x: Tensor | TorchDataset,
    y: Tensor | None,
    device: str | None = None,
) -> tuple[Records, dict[str, float | int]]:
    """The client's whole job: decode the message, train under the prior, encode the reply (``x`` may be a
    map-style torch ``Dataset`` of (x, y) pairs, with ``y=None``: :func:`fedbayes.local.train_local`)."""
    task, settings, reply = decode_job({k: tuple(v.shape) for k, v in model.named_parameters()}, records, config,
                                       device)
    res = train_local(model, task.prior, x, y, settings, start_mean=task.start_mean, start_prec=task.start_prec)
    return encode_result(res, reply)

