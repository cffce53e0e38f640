"""fedbayes' messages as Flower records, in one place: the codec both sides share (:class:`fedbayes.flower.FedBayes`
on the server, :func:`fedbayes.flower.train` in a ClientApp; this project's own apps, ``server/`` and ``client/``,
use the same).

A message's content is a Flower ``RecordDict``:

* one ``ArrayRecord`` per record of the wire format of :mod:`fedbayes.protocol` (``prior.eta``, ``prior.prec``,
  ``start.mean``, ``start.prec`` down; ``site.eta``/``site.prec`` or ``mean`` up), keyed by parameter name;
* down, also :data:`ARRAYS_RECORD` (``arrays``): the global model, as Flower's strategies send it, for a
  ClientApp that loads it into its model (fedbayes' client ignores it: the start point is ``start.mean``);
* the ``config`` ``ConfigRecord`` (down): the local settings of the client (``LocalSettings.to_wire``), ``reply``,
  ``round``, ``partition-id`` (and whatever the ServerApp added with ``train_config``).  This project's own app
  adds :data:`EXPERIMENT_KEY`, the run's resolved configuration as the JSON of its ``config.json``: its ServerApp
  resolves the run config (presets included) once; every one of its ClientApps rebuilds its model and data from
  this one resolved config, so a client never resolves presets and can never disagree with the server about them;
* the ``metrics`` ``MetricRecord`` (up): ``num-examples``, ``partition-id`` and training metrics.

Imports flwr and numpy only (a ClientApp's import must stay light).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = ["ARRAYS_RECORD", "CONFIG_RECORD", "EXPERIMENT_KEY", "METRIC_RECORD", "Records", "arrays_of", "content_of",
           "records_of"]

ARRAYS_RECORD = "arrays"
"""The global model in a train message, as Flower's strategies send it (for the ClientApp; fedbayes ignores it)."""
CONFIG_RECORD = "config"
METRIC_RECORD = "metrics"
EXPERIMENT_KEY = "experiment"

Records = dict[str, dict[str, np.ndarray]]


def records_of(content: RecordDict) -> Records:
    """A message's ``ArrayRecord``s -> the wire format (``{record: {parameter: array}}``)."""
    return {name: {k: arr.numpy() for k, arr in rec.items()} for name, rec in content.array_records.items()}


def arrays_of(rec: Mapping[str, Any]) -> ArrayRecord:
    """Named arrays (NumPy, or tensors on any device) -> an ``ArrayRecord``."""
    out = {}
    for k, v in rec.items():
        if not isinstance(v, np.ndarray):
            v = v.detach().cpu().numpy()
        out[k] = Array(np.ascontiguousarray(v))
    return ArrayRecord(out)


def content_of(
    records: Mapping[str, Mapping[str, Any]],
    *,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> RecordDict:
    """The wire format (plus a ``config`` or ``metrics`` record) -> a message's ``RecordDict``."""
    rd = RecordDict({name: arrays_of(rec) for name, rec in records.items()})
    if config is not None:
        rd[CONFIG_RECORD] = ConfigRecord(dict(config))
    if metrics is not None:
        rd[METRIC_RECORD] = MetricRecord(dict(metrics))
    return rd
