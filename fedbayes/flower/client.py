"""The one call a ClientApp makes: :func:`train` (the user's model, the user's data, the prior the message carries).

A ClientApp of any Flower app turns a fedbayes train message into its reply with::

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        net = Net()
        trainloader, _ = load_data(context.node_config["partition-id"], ...)
        content = fedbayes.flower.train(msg, net, trainloader, epochs, lr, device)
        return Message(content=content, reply_to=msg)

(``epochs`` and ``lr`` may be None: the message's, which the ServerApp sets.)

The message (sent by :class:`fedbayes.flower.FedBayes`) carries the prior (``prior.eta``, ``prior.prec``), an
optional start point and the local settings of this client and round (:mod:`fedbayes.flower.records`); the
training is the one local trainer of every engine (:func:`fedbayes.protocol.execute`, i.e.
:func:`fedbayes.local.train_local`), so a Flower client computes what the in-process engine computes.  The reply
carries the site (``site.eta``, ``site.prec``) for Bayesian rules or the mean for the others, plus
``num-examples``, ``partition-id`` and the training metrics; :func:`train` returns the reply's content.

**Data.** ``(x, y)`` tensors, or a ``torch.utils.data.DataLoader`` (any iterable of batches).  The trainer works
on in-memory tensors with its own seeded minibatch order (the same order in every engine), so a loader is
materialised once per call: a map-style dataset is read **in index order** (``loader.dataset[i]`` for
i = 0..N−1, collated with the loader's ``collate_fn``), so a shuffling loader gives the same tensors every round;
any other iterable is read batch by batch.  A batch is ``(x, y)`` (extra items ignored) or a mapping, read with
``keys`` (default: ``("x", "y")``, ``("img", "label")`` or ``("image", "label")``, whichever it has).  Random
transforms are therefore drawn once per call, not per epoch.  (When the trainer learns to read a Dataset itself,
issue 24 §2, this function hands the loader's dataset to it instead; the signature stays.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import Message, RecordDict
from torch import Tensor, nn

from fedbayes.flower.records import ARRAYS_RECORD, CONFIG_RECORD, content_of, records_of

__all__ = ["BATCH_KEYS", "as_tensors", "train"]

BATCH_KEYS: tuple[tuple[str, str], ...] = (("x", "y"), ("img", "label"), ("image", "label"))
"""The (input, label) keys tried, in order, for a batch that is a mapping (Flower's datasets give ``img``)."""

Data = tuple[Tensor, Tensor] | Iterable[Any]


def _split_batch(batch: Any, keys: Sequence[str] | None) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        tries = [tuple(keys)] if keys is not None else list(BATCH_KEYS)
        for kx, ky in tries:
            if kx in batch and ky in batch:
                return torch.as_tensor(batch[kx]), torch.as_tensor(batch[ky])
        raise ValueError(f"a batch is a mapping with keys {sorted(batch)}; pass keys=(input_key, label_key) "
                         f"(tried {tries})")
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
    raise ValueError(f"a batch must be (x, y) or a mapping of tensors, got {type(batch).__name__}")


def _batches(data: Iterable[Any]) -> Iterable[Any]:
    """The loader's batches; a map-style dataset in index order with the loader's own collate function."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader) and hasattr(type(data.dataset), "__getitem__") \
            and hasattr(data.dataset, "__len__"):
        return DataLoader(data.dataset, batch_size=data.batch_size or 256, shuffle=False,
                          collate_fn=data.collate_fn, num_workers=0)
    return data


def as_tensors(data: Data, keys: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from tensors, arrays, or a DataLoader (see the module docstring for the order).

    Raises
    ------
    ValueError
        Empty data, batches that are neither ``(x, y)`` nor a mapping with known keys, or x and y of different
        lengths.
    """
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], list | tuple | Mapping):
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    else:
        xs, ys = [], []
        for batch in _batches(data):
            bx, by = _split_batch(batch, keys)
            xs.append(bx)
            ys.append(by.reshape(-1) if by.dim() > 1 and by.shape[-1] == 1 else by)
        if not xs:
            raise ValueError("the client's data is empty (the loader gave no batch)")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("the client's data is empty")
    if x.dtype == torch.float64:
        x = x.float()
    return x, y


def _device(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


def train(
    msg: Message,
    net: nn.Module,
    data: Data,
    epochs: int | None = None,
    lr: float | None = None,
    device: str | torch.device | None = None,
    *,
    partition_id: int | None = None,
    keys: Sequence[str] | None = None,
) -> RecordDict:
    """Train ``net`` on ``data`` under the prior ``msg`` carries, with the local settings it carries; the reply.

    The call has the shape of Flower's quickstart ``train(net, trainloader, epochs, lr, device)`` with the
    message first, so a ClientApp written for FedAvg keeps its arguments.

    Parameters
    ----------
    msg
        A train message of :class:`fedbayes.flower.FedBayes` (its ``config`` ConfigRecord and prior ArrayRecords).
    net
        The user's model (its parameter names and shapes must be those of the ServerApp's ``initial_arrays``;
        its weights are overwritten: with the message's start point, then by training).
    data
        ``(x, y)`` tensors, or a DataLoader / iterable of ``(x, y)`` or mapping batches (module docstring).
    epochs, lr
        The ClientApp's own local epochs and (IVON/Adam/SGD) learning rate, as Flower's quickstart reads them from
        its run config and message; None: the message's (the ServerApp's ``local=`` or ``train_config``).  A
        value given here replaces the message's for this client only (the ServerApp's ``config.json`` records
        its own).
    device
        Where to train (``"cpu"``, ``"cuda"``, ``torch.device``); None: CUDA if available, else CPU.
    partition_id
        The client's identity to report (this project's ClientApp passes its node config's ``partition-id``);
        None: the one the message names.
    keys
        ``(input_key, label_key)`` of mapping batches.

    Returns
    -------
    RecordDict
        The reply's content (``return Message(content=content, reply_to=msg)``, as Flower's handlers end):
        ``site.eta``/``site.prec`` (Bayesian rules) or ``mean`` ArrayRecords, and the ``metrics`` MetricRecord
        (``num-examples``, ``partition-id``, ``train-loss``, ``train-seconds``, ``steps``, …).

    Raises
    ------
    ValueError
        A message without fedbayes' config or prior, a model whose parameters differ from the message's (naming
        them), bad local settings (``epochs`` < 1, ``lr`` <= 0, …), unusable data.
    """
    from fedbayes.protocol import execute

    if CONFIG_RECORD not in msg.content.config_records:
        raise ValueError(f"message lacks the '{CONFIG_RECORD}' ConfigRecord (has {sorted(msg.content)}): "
                         "is it a fedbayes.flower.FedBayes train message?")
    config = dict(msg.content.config_records[CONFIG_RECORD])
    if epochs is not None:
        config["epochs"] = epochs
    if lr is not None:
        config["lr"] = lr
    x, y = as_tensors(data, keys)
    records = {k: v for k, v in records_of(msg.content).items() if k != ARRAYS_RECORD}
    reply, metrics = execute(net, records, config, x, y, device=_device(device))
    pid = partition_id if partition_id is not None else config.get("partition-id")
    out: dict[str, Any] = dict(metrics)
    if pid is not None:
        out["partition-id"] = int(pid)  # type: ignore[call-overload,arg-type]
    return content_of(reply, metrics=out)
