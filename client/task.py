"""The ClientApp's work: who this node is, its data, and one train message -> one reply.

Kept apart from :mod:`client.app` so that importing the app stays light (no torch); the handlers import this
module on their first message.

**Identity.** A node is the client ``partition-id`` of its node config (Flower's simulation sets it, a
deployment passes ``--node-config "partition-id=0 num-partitions=3"``); the Flower node id is not used.

**Data.** Either the node config names ``data-path``, the client's own ``.npz`` file with ``x`` (N examples,
any shape after the first axis, kept as it is and checked with one forward pass of the model:
:func:`fedbayes.federation.file_client`) and ``y`` (N labels: integers 0..C-1 for classification, floats for
regression), or the client rebuilds partition ``partition-id`` (and nothing else) of the
run's dataset exactly as the in-process engine does (:func:`fedbayes.federation.one_client`).  The run's configuration
is the one the ServerApp resolved, carried by every message (:mod:`fedbayes.flower.records`), so a client reads no
presets and resolves it once per process; of Flower's run config it reads only ``data-dir``.  Model and data are
cached per process, so a simulation actor loads them once per run.

**Device.** Node config ``device`` (auto|cpu|cuda) wins over the run config's ``device``.

**Fault injection (tests only).** Node config ``fault="garbage"`` makes the node reply garbage to every train
message without training: NaN arrays in odd rounds, arrays of the wrong shape in even rounds (the ServerApp must
drop them and list the client as failed).  It is honoured **only** when the SuperNode's environment has
``FEDBAYES_TEST_FAULTS=1`` (:data:`FAULTS_ENV`); otherwise the key is ignored with a warning and the node trains
normally, so a production node config cannot trigger it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from fedbayes.config import Experiment
from fedbayes.flower.records import CONFIG_RECORD, EXPERIMENT_KEY, METRIC_RECORD, content_of, records_of

__all__ = [
    "DEVICES",
    "FAULTS",
    "FAULTS_ENV",
    "LocalData",
    "NodeSpec",
    "garbage_reply",
    "handle_query",
    "handle_train",
    "load_npz",
    "local_data",
    "node_fault",
    "node_spec",
]

DEVICES = ("auto", "cpu", "cuda")
FAULTS = ("garbage",)
"""Values of node config ``fault`` (honoured only with :data:`FAULTS_ENV` = 1)."""
FAULTS_ENV = "FEDBAYES_TEST_FAULTS"
"""The environment variable that must be ``1`` in the SuperNode's environment for ``fault`` to act."""

log = logging.getLogger("flwr")


@dataclass(frozen=True)
class NodeSpec:
    """What a node's config says about it."""

    partition_id: int
    num_partitions: int | None
    data_path: Path | None
    device: str | None


def _int_value(key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"node config '{key}' must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    raise ValueError(f"node config '{key}' must be an integer, got {v!r}")


def node_spec(node_config: Mapping[str, Any], num_clients: int) -> NodeSpec:
    """Validate a node config against the run's ``num-clients``.

    Raises
    ------
    ValueError
        Missing or non-integer ``partition-id``, a ``partition-id`` outside ``[0, num-clients)``, a
        ``num-partitions`` that differs from ``num-clients``, an unknown ``device``; the message names the key.
    """
    if "partition-id" not in node_config:
        raise ValueError(
            f"node config lacks 'partition-id' (has {sorted(node_config)}); start the SuperNode with "
            f"--node-config \"partition-id=<0..{num_clients - 1}> num-partitions={num_clients}\""
        )
    pid = _int_value("partition-id", node_config["partition-id"])
    if not 0 <= pid < num_clients:
        raise ValueError(f"node config 'partition-id'={pid} is out of range [0, {num_clients}) (run's num-clients)")
    nparts = None
    if "num-partitions" in node_config:
        nparts = _int_value("num-partitions", node_config["num-partitions"])
        if nparts != num_clients:
            raise ValueError(
                f"node config 'num-partitions'={nparts} differs from the run config's num-clients={num_clients} "
                f"(simulation: --federation-config \"num-supernodes={num_clients}\", or -c \"num-clients={nparts}\")"
            )
    data_path = None
    if "data-path" in node_config:
        raw = node_config["data-path"]
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"node config 'data-path' must be a file path string, got {raw!r}")
        data_path = Path(raw).expanduser()
    device = None
    if "device" in node_config:
        device = str(node_config["device"])
        if device not in DEVICES:
            raise ValueError(f"node config 'device' must be one of {list(DEVICES)}, got {device!r}")
    return NodeSpec(pid, nparts, data_path, device)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class LocalData:
    """A client's model (the architecture; weights come with every message) and its examples."""

    model: nn.Module
    x: Tensor
    y: Tensor
    source: str
    """``"partition"`` (rebuilt from the run config) or ``"file"`` (node config ``data-path``)."""

    @property
    def num_examples(self) -> int:
        return len(self.x)


def load_npz(path: Path, exp: Experiment) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a client's ``.npz`` file (``x``: N x ..., ``y``: N labels).

    Raises
    ------
    ValueError
        Unreadable file, missing arrays, wrong shapes or dtypes, labels out of range; the message names the
        path and the problem.
    """
    from fedbayes.data.datasets import get_spec
    from fedbayes.data.user import load_client_file

    spec = get_spec(exp.run.dataset)
    return load_client_file(path, spec.task, spec.num_classes)


_lock = threading.Lock()
_cache: dict[str, LocalData] = {}


def _data_key(exp: Experiment, spec: NodeSpec, data_dir: Path | None) -> str:
    flat = exp.to_flat()
    flat.pop("device", None)
    if spec.data_path is not None:
        st = spec.data_path.stat() if spec.data_path.exists() else None
        src = ["file", str(spec.data_path.resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0]
    else:
        src = ["partition", spec.partition_id, str(data_dir)]
    return json.dumps([flat, src], sort_keys=True, default=str)


def _build(exp: Experiment, spec: NodeSpec, data_dir: Path | None) -> LocalData:
    from fedbayes.federation import file_client, one_client

    # the device is chosen per call (a valid change of two validated keys: no second resolve)
    cpu_exp = Experiment(exp.run.model_copy(update={"device": "cpu", "store": "memory"}), exp.algo)
    if spec.data_path is None:  # only this partition's tensors (no other client's, no server rule)
        model, x, y = one_client(cpu_exp, spec.partition_id, data_dir)
        return LocalData(model, x, y, "partition")  # type: ignore[arg-type]  # x: a Dataset with data = "pkg:fn"
    return LocalData(*file_client(cpu_exp, spec.data_path), "file")


def local_data(exp: Experiment, spec: NodeSpec, data_dir: Path | None) -> LocalData:
    """This node's model and data, built once per process and run config."""
    key = _data_key(exp, spec, data_dir)
    with _lock:
        if key not in _cache:
            if len(_cache) >= 8:
                _cache.pop(next(iter(_cache)))
            _cache[key] = _build(exp, spec, data_dir)
        return _cache[key]


# ------------------------------------------------------------------------------------------- messages
_experiments: dict[str, Experiment] = {}


def message_config(msg: Message) -> dict[str, Any]:
    """The message's ``config`` record (``ValueError`` if it has none)."""
    if CONFIG_RECORD not in msg.content.config_records:
        raise ValueError(f"message lacks the '{CONFIG_RECORD}' ConfigRecord (has {sorted(msg.content)})")
    return dict(msg.content.config_records[CONFIG_RECORD])


def message_experiment(config: Mapping[str, Any]) -> Experiment:
    """The run's configuration as the ServerApp resolved it (:data:`fedbayes.flower.records.EXPERIMENT_KEY`), resolved
    once per process and config; ``ValueError`` (a ``ConfigError``) naming the problem."""
    from fedbayes.config import ConfigError, resolve

    text = config.get(EXPERIMENT_KEY)
    if not isinstance(text, str):
        raise ValueError(f"message config lacks '{EXPERIMENT_KEY}' (the run's resolved config, sent by the ServerApp)")
    if text not in _experiments:
        try:
            flat = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"message config '{EXPERIMENT_KEY}' is not JSON: {e}") from None
        if not isinstance(flat, dict):
            raise ConfigError(f"message config '{EXPERIMENT_KEY}' must be a JSON object")
        with _lock:
            if len(_experiments) >= 8:
                _experiments.pop(next(iter(_experiments)))
            _experiments[text] = resolve(flat)
    return _experiments[text]


def data_dir(run_config: Mapping[str, Any]) -> Path | None:
    """The run config's Flower-only ``data-dir`` ("" or absent: fedbayes' default cache)."""
    raw = run_config.get("data-dir", "")
    if not isinstance(raw, str):
        raise ValueError(f"run config 'data-dir' must be a path string ('' = default cache), got {raw!r}")
    return Path(raw).expanduser() if raw.strip() else None


def _setup(msg: Message, context: Context) -> tuple[Experiment, NodeSpec, dict[str, Any]]:
    config = message_config(msg)
    exp = message_experiment(config)
    return exp, node_spec(context.node_config, exp.run.num_clients), config


def handle_query(msg: Message, context: Context) -> Message:
    """Reply with this node's ``partition-id``, ``num-examples`` and whether it uses its own data file."""
    exp, spec, _ = _setup(msg, context)
    data = local_data(exp, spec, data_dir(context.run_config))
    metrics: dict[str, Any] = {
        "partition-id": spec.partition_id,
        "num-examples": data.num_examples,
        "own-data": int(data.source == "file"),
    }
    return Message(RecordDict({METRIC_RECORD: MetricRecord(metrics)}), reply_to=msg)


def _check_fit(model: nn.Module, records: Mapping[str, Mapping[str, np.ndarray]], data: LocalData) -> None:
    if data.source != "file" or "prior.eta" not in records:
        return
    for name, p in model.named_parameters():
        got = records["prior.eta"].get(name)
        if got is not None and tuple(got.shape) != tuple(p.shape):
            raise ValueError(
                f"node config 'data-path': the file's x has {data.x.shape[1]} features, which gives the local model "
                f"parameter '{name}' shape {tuple(p.shape)}, but the server sent {tuple(got.shape)}; the file must "
                f"have the feature count of the run's dataset"
            )


def node_fault(node_config: Mapping[str, Any]) -> str | None:
    """The node config's ``fault`` if fault injection is enabled (``FEDBAYES_TEST_FAULTS=1``), else None.

    Raises
    ------
    ValueError
        Fault injection is enabled and ``fault`` is not one of :data:`FAULTS`.
    """
    if "fault" not in node_config:
        return None
    fault = str(node_config["fault"])
    if os.environ.get(FAULTS_ENV) != "1":
        log.warning("node config 'fault'=%r ignored: fault injection is for tests and needs %s=1 in the "
                    "SuperNode's environment", fault, FAULTS_ENV)
        return None
    if fault not in FAULTS:
        raise ValueError(f"node config 'fault' must be one of {list(FAULTS)}, got {fault!r}")
    return fault


def garbage_reply(records: Mapping[str, Mapping[str, np.ndarray]], config: Mapping[str, Any],
                  num_examples: int) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """A well-formed reply with garbage arrays: NaN in odd rounds, one extra row (wrong shape) in even rounds."""
    prior = records["prior.eta"]
    names = ["site.eta", "site.prec"] if config.get("reply") == "site" else ["mean"]
    odd = int(config.get("round", 1)) % 2 == 1
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        if odd:
            out[name] = {k: np.full(v.shape, np.nan, dtype=np.float32) for k, v in prior.items()}
        else:
            out[name] = {k: np.ones((v.shape[0] + 1, *v.shape[1:]), dtype=np.float32) for k, v in prior.items()}
    return out, {"num-examples": num_examples, "train-loss": float("nan")}


def handle_train(msg: Message, context: Context) -> Message:
    """Decode the message, train under the prior and reply: :func:`fedbayes.flower.train`, the client helper any
    ClientApp calls (this app's data are the node's partition or ``data-path`` file)."""
    from fedbayes.federation import resolve_device
    from fedbayes.flower import train

    exp, spec, config = _setup(msg, context)
    target: Any = config.get("partition-id")
    if target is not None and target != spec.partition_id:
        raise ValueError(f"train message for partition {target} reached the node with partition-id {spec.partition_id}")
    fault = node_fault(context.node_config)
    data = local_data(exp, spec, data_dir(context.run_config))
    records = records_of(msg.content)
    _check_fit(data.model, records, data)
    if fault == "garbage":
        reply, metrics = garbage_reply(records, config, data.num_examples)
        return Message(content_of(reply, metrics={**metrics, "partition-id": spec.partition_id}), reply_to=msg)
    device = resolve_device(spec.device or exp.run.device)
    return Message(train(msg, data.model, (data.x, data.y), device=device, partition_id=spec.partition_id),
                   reply_to=msg)
