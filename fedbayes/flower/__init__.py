"""fedbayes in a Flower app: the only part of fedbayes that imports ``flwr``.

* :class:`FedBayes` — a Strategy any ServerApp constructs from a rule (``FedBayes(rule="bayes-admm", local={...})``)
  and starts as Flower's own (``strategy.start(grid=..., initial_arrays=ArrayRecord(net.state_dict()),
  num_rounds=..., evaluate_fn=...)``), with checkpointing and resume into an optional results folder;
* :func:`train` — the one call a ClientApp makes: ``content = fedbayes.flower.train(msg, net, trainloader)`` trains
  the app's model on the app's data under the prior the message carries and returns the reply's content;
* :mod:`fedbayes.flower.records` — the record codec both sides share.

This project's own Flower app (``server/``, ``client/``) is built on these same names.  Nothing here imports the
tuning or plotting extras (optuna, matplotlib): a ClientApp needs only ``pip install fedbayes``.
``examples/quickstart-pytorch/`` is Flower's quickstart converted to Bayes-ADMM; docs/flower.md explains.
"""

from fedbayes.flower.client import as_tensors, train
from fedbayes.flower.records import CONFIG_RECORD, EXPERIMENT_KEY, METRIC_RECORD, arrays_of, content_of, records_of
from fedbayes.flower.strategy import FedBayes, rule_class

__all__ = [
    "CONFIG_RECORD",
    "EXPERIMENT_KEY",
    "METRIC_RECORD",
    "FedBayes",
    "arrays_of",
    "as_tensors",
    "content_of",
    "records_of",
    "rule_class",
    "train",
]
