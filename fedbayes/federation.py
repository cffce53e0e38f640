"""A federation, ready to run: its data, the clients' partition, the model, the server rule and the device.

:class:`Federation` and its builders are what every engine starts from — the in-process engine
(:mod:`fedbayes.engine`), the round policy (:mod:`fedbayes.rounds`), the what-if retraining and the Flower apps —
so they live here, below all of them: nothing in this module imports an engine, the round policy or Flower.
:func:`one_client` gives one client's model and data exactly as :meth:`Federation.build` does (what a ClientApp
needs).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from fedbayes.algorithms import Algorithm
from fedbayes.algorithms.store import ClientStore, DiskStore, MemoryStore, state_dtype
from fedbayes.config import PYTHON, ConfigError, Experiment
from fedbayes.data import Dataset, load_dataset, partition, pool, split_summary
from fedbayes.data.user import (
    FederatedData,
    as_tensors,
    build_user_model,
    call_data_function,
    check_fit,
    client_sizes,
    example_batch,
    input_shape_of,
    is_import_path,
    targets,
)
from fedbayes.data.validation import ValidationSet, split_validation
from fedbayes.models import build_model
from fedbayes.results import atomic_write_bytes, checkpoint_files

__all__ = [
    "Federation", "batched_clients", "client_parts", "file_client", "load_partitioned", "make_model", "make_store",
    "one_client", "resolve_device",
]

log = logging.getLogger("fedbayes")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return device


@dataclass
class Federation:
    """Data, partition, model and rule of one experiment, ready to run."""

    exp: Experiment
    data: Dataset
    parts: list[np.ndarray]
    model: nn.Module
    rule: Algorithm
    device: str
    client_data: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """Each client's ``(x, y)`` tensors, or ``(dataset, None)`` for a map-style torch Dataset (user data)."""
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    validation: ValidationSet | None = None
    """The validation set (``validation-fraction`` > 0; :mod:`fedbayes.data.validation`), else None."""
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    batched: bool = False
    """Train each round's clients at once (:mod:`fedbayes.batched`, run key ``client-engine``)."""
    user_data: FederatedData | None = None
    """The user's own data (run key ``data``, or :func:`fedbayes.run`); then ``data`` holds only its task, classes
    and input shape, and ``parts`` are consecutive ranges of the clients' sizes."""

    @staticmethod
    def build(exp: Experiment, out_dir: Path | None = None, data_dir: Path | None = None) -> Federation:
        run = exp.run
        _refuse_python(exp)
        if run.data:
            user = call_data_function(run.data, run.seed, run.num_clients)
            shape = input_shape_of(user.clients[0])
            outputs = user.num_classes if user.task == "classification" and user.num_classes else 1
            model = _user_or_builtin(exp, shape, outputs)
            return Federation.from_data(exp, model, user, out_dir)
        data, parts, validation = load_partitioned(exp, data_dir)
        model = make_model(exp, data)
        if is_import_path(run.model):
            check_fit(model, torch.from_numpy(data.x_train[:2]), data.task, data.num_classes or 1,
                      f"the examples of {run.dataset}")
        template = {k: v.detach() for k, v in model.named_parameters()}
        store = make_store(exp, out_dir, {k: tuple(v.shape) for k, v in template.items()})
        active = [c for c in range(run.num_clients) if c not in set(run.exclude_clients)]
        rule = exp.algorithm_cls(template, run.num_clients, exp.algo, store=store, active=active,
                                 participants=run.participants_per_round())
        device = resolve_device(run.device)
        ydt = torch.long if data.task == "classification" else torch.float32
        client_data = [
            (torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx]).to(ydt)) for idx in parts
        ]
        fed = Federation(exp, data, parts, model, rule, device, client_data)
        fed.batched = batched_clients(exp, model, device)
        fed.x_test = torch.from_numpy(data.x_test)
        fed.y_test = torch.from_numpy(data.y_test).to(ydt)
        if validation is not None:
            fed.validation = validation
            fed.x_val = torch.from_numpy(validation.x)
            fed.y_val = torch.from_numpy(validation.y).to(ydt)
        return fed

    @staticmethod
    def from_data(exp: Experiment, model: nn.Module, user: FederatedData, out_dir: Path | None = None) -> Federation:
        """A federation of a model object and the user's data (:class:`fedbayes.data.user.FederatedData`): the same
        rule, store and device as :meth:`build`; the model is checked against client 0's data with one forward
        pass before anything trains (:func:`fedbayes.data.user.check_fit`).

        Raises
        ------
        ConfigError
            ``num-clients`` differs from the number of clients, or regression data without ``loss = "gaussian"``.
        fedbayes.data.user.UserDataError
            The model does not take the data (the message names the shapes).
        """
        run = exp.run
        if len(user.clients) != run.num_clients:
            raise ConfigError(f"the data has {len(user.clients)} clients but num-clients = {run.num_clients}")
        if user.task == "regression" and exp.local_setting("loss") != "gaussian":
            raise ConfigError("regression data needs loss = 'gaussian' (a Gaussian likelihood; noise-var sets σ²)")
        classes = int(user.num_classes or 0)
        check_fit(model, example_batch(user.clients[0])[0], user.task, max(classes, 1), "client 0's data")
        shape = input_shape_of(user.clients[0])
        sizes = client_sizes(user.clients)
        ends = np.cumsum([0, *sizes])
        parts = [np.arange(a, b) for a, b in itertools.pairwise(ends)]
        ydt = np.int64 if user.task == "classification" else np.float32
        empty_x, empty_y = np.zeros((0, *shape), np.float32), np.zeros(0, ydt)
        data = Dataset(PYTHON if run.data in ("", PYTHON) else run.data, empty_x, empty_y, empty_x, empty_y,
                       user.task, classes, shape)
        template = {k: v.detach() for k, v in model.named_parameters()}
        store = make_store(exp, out_dir, {k: tuple(v.shape) for k, v in template.items()})
        active = [c for c in range(run.num_clients) if c not in set(run.exclude_clients)]
        rule = exp.algorithm_cls(template, run.num_clients, exp.algo, store=store, active=active,
                                 participants=run.participants_per_round())
        device = resolve_device(run.device)
        client_data: list[Any] = [(c[0], targets(c[1], user.task)) if isinstance(c, tuple) else (c, None)
                                  for c in user.clients]  # (Dataset, None): the trainer's form of a Dataset
        fed = Federation(exp, data, parts, model, rule, device, client_data, user_data=user)
        fed.batched = batched_clients(exp, model, device, client_data)
        x_test, y_test = as_tensors(user.test)
        fed.x_test, fed.y_test = x_test, targets(y_test, user.task)
        if user.validation is not None:
            x_val, y_val = as_tensors(user.validation)
            fed.x_val, fed.y_val = x_val, targets(y_val, user.task)
        return fed

    def summary(self) -> str:
        """One line on the clients: count, sizes (and classes per client for built-in data)."""
        if self.user_data is not None:
            return split_summary(self.parts, np.zeros(len(self.parts) and int(self.parts[-1][-1]) + 1, np.float32))
        return split_summary(self.parts, self.data.y_train)

    def eval_data(self) -> tuple[Tensor, Tensor, str]:
        """What each round is evaluated on (run key ``eval-split``) and its metric-key prefix: the test set
        (``"test_"``) or the validation set (``"val_"``)."""
        if self.exp.run.eval_split == "validation":
            if self.x_val is None or self.y_val is None:
                raise ValueError("eval-split = 'validation' but the federation has no validation set")
            return self.x_val, self.y_val, "val_"
        assert self.x_test is not None and self.y_test is not None
        return self.x_test, self.y_test, "test_"

    def write_split(self, out_dir: Path) -> None:
        """``split.json``: the validation split's summary and fingerprint (nothing without a validation set)."""
        if self.validation is None:
            return
        info = {"eval-split": self.exp.run.eval_split, **self.validation.summary()}
        atomic_write_bytes(Path(out_dir) / "split.json", (json.dumps(info, indent=2) + "\n").encode())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model.named_parameters()}

    def client_examples(self, client: int) -> int:
        """Client k's example count (what its reply's ``num-examples`` must say)."""
        return len(self.parts[client])


def batched_clients(exp: Experiment, model: nn.Module, device: str, clients: list[Any] | None = None) -> bool:
    """Whether rounds train their clients batched (run key ``client-engine``): ``batched`` → True, or a
    ``ConfigError`` saying why the model, the local mode or the clients' data (a torch ``Dataset``: one
    ``DataLoader`` per client) cannot be; ``auto`` → True on a GPU where it can be (otherwise one log line and the
    sequential path); ``sequential`` → False."""
    from fedbayes.batched import BATCHED_MODES, Unbatchable, check_batchable, chunk_size, model_client_bytes

    choice = exp.run.client_engine
    if choice == "sequential" or (choice == "auto" and device != "cuda"):
        return False
    mode = exp.local_setting("mode")
    try:
        if mode not in BATCHED_MODES:
            raise Unbatchable(f"local mode '{mode}' is not batched (batched modes: {list(BATCHED_MODES)})")
        loaders = [k for k, c in enumerate(clients or []) if not isinstance(c, tuple) or c[1] is None]
        if loaders:
            raise Unbatchable(f"clients {loaders[:5]} are torch Datasets (each goes through its own DataLoader); "
                              "the batched clients take (x, y) tensors")
        check_batchable(model)
        if exp.run.batch_clients > 0:  # a chunk that does not fit is refused before any training
            per = model_client_bytes(model, int(exp.local_setting("batch_size")), str(mode))
            try:
                chunk_size(exp.run.batch_clients, exp.run.batch_clients, per, torch.device(device))
            except ValueError as e:
                raise ConfigError(str(e)) from None
    except Unbatchable as e:
        if choice == "batched":
            raise ConfigError(f"client-engine = 'batched': {e}; use client-engine = 'sequential'") from None
        log.info("client-engine auto: training clients one after another on %s (%s)", device, e)
        return False
    return True


def load_partitioned(exp: Experiment, data_dir: Path | None = None
                     ) -> tuple[Dataset, list[np.ndarray], ValidationSet | None]:
    """The run's dataset, its clients' index arrays and its validation set (``validation-fraction`` > 0: from
    the examples no client holds, else held out before partitioning; :mod:`fedbayes.data.validation`)."""
    run = exp.run
    data = load_dataset(run.dataset, data_dir=data_dir, train_fraction=run.train_fraction, seed=run.seed,
                        raw_pixels=run.raw_pixels, keep_rest=run.validation_fraction > 0)
    parts = client_parts(exp, data)
    validation = None
    if run.validation_fraction > 0:
        data, parts, validation = split_validation(data, parts, run.validation_fraction, run.seed,
                                                   lambda d: client_parts(exp, d))
    return data, parts, validation


def one_client(exp: Experiment, client: int, data_dir: Path | None = None
               ) -> tuple[nn.Module, Tensor | TorchDataset, Tensor | None]:
    """Client ``client``'s model and data exactly as :meth:`Federation.build` gives them, without the other
    clients' tensors or a server rule: what a ClientApp needs.  With run key ``data`` the data is that function's
    client (``(x, y)`` tensors, or a torch ``Dataset`` and None)."""
    _refuse_python(exp)
    if exp.run.data:
        user = call_data_function(exp.run.data, exp.run.seed, exp.run.num_clients)
        if not 0 <= client < len(user.clients):
            raise ValueError(f"partition-id {client} out of range [0, {len(user.clients)})")
        outputs = user.num_classes if user.task == "classification" and user.num_classes else 1
        c = user.clients[client]
        model = _user_or_builtin(exp, input_shape_of(c), outputs)
        check_fit(model, example_batch(c)[0], user.task, max(int(user.num_classes or 0), 1),
                  f"client {client}'s data")
        if isinstance(c, tuple):
            return model, c[0], targets(c[1], user.task)
        return model, c, None
    data, parts, _ = load_partitioned(exp, data_dir)
    if not 0 <= client < len(parts):
        raise ValueError(f"partition-id {client} out of range [0, {len(parts)})")
    ydt = torch.long if data.task == "classification" else torch.float32
    idx = parts[client]
    return make_model(exp, data), torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx]).to(ydt)


def client_parts(exp: Experiment, data: Dataset) -> list[np.ndarray]:
    """The clients' index arrays into ``data``'s training set: the run's partition scheme with its keys, or, with
    ``pool-clients`` = K > 0, the union of that scheme's K clients as the one client's data.

    Raises
    ------
    ConfigError
        A partition key that does not fit the loaded data (e.g. ``per-class`` above a class's size).
    """
    run = exp.run
    params: dict[str, Any] = {}
    if run.partition == "dirichlet":
        params = {"size_alpha": run.size_alpha, "class_alpha": run.class_alpha}
    elif run.partition == "shards":
        params = {"classes_per_client": run.classes_per_client}
        if run.per_class is not None:
            params["per_class"] = run.per_class
    elif run.partition == "paper":
        params = {"size_alpha": run.size_alpha, "class_alpha": run.class_alpha, "per_class": run.per_class}
    k = run.pool_clients if run.pool_clients > 0 else run.num_clients
    try:
        parts = partition(data.y_train, k, run.partition, seed=run.seed, **params)
    except ValueError as e:
        keys = {"per_class": "per-class", "classes_per_client": "classes-per-client", "num_clients": "num-clients"}
        msg = str(e)
        for snake, kebab in keys.items():
            msg = msg.replace(snake, kebab)
        if run.pool_clients > 0:
            msg = msg.replace("num-clients", "pool-clients")
        raise ConfigError(f"partition '{run.partition}' of {run.dataset}: {msg}") from None
    return [pool(parts)] if run.pool_clients > 0 else parts


def make_store(exp: Experiment, out_dir: Path | None, shapes: Mapping[str, tuple[int, ...]]) -> ClientStore:
    """The run's client store (:mod:`fedbayes.algorithms.store`): ``store = "disk"`` with a results folder keeps
    the clients in its ``checkpoint/clients`` (the checkpoint's own files, so checkpoints copy nothing); otherwise
    memory.  Both keep ``client-state-dtype``."""
    run = exp.run
    dtype = state_dtype(run.client_state_dtype)
    if run.store == "disk" and out_dir is not None:
        files = checkpoint_files(out_dir, exp.to_flat(), shapes=shapes)
        return DiskStore(files, dtype, cache_bytes=int(run.store_cache_mb * 2**20))
    return MemoryStore(dtype)


def file_client(exp: Experiment, path: Path) -> tuple[nn.Module, Tensor, Tensor]:
    """A deployed node's model and its own data file (node config ``data-path``,
    :func:`fedbayes.data.user.load_client_file`): the file's examples keep their shape, and one forward pass checks
    that the run's model takes them (a ``UserDataError`` naming the file's shape and the model's output)."""
    from fedbayes.data.datasets import get_spec
    from fedbayes.data.user import load_client_file

    _refuse_python(exp)
    if exp.run.data:
        raise ConfigError(f"node config 'data-path' and run key data = {exp.run.data!r} both give the data; use one")
    spec = get_spec(exp.run.dataset)
    x_np, y_np = load_client_file(path, spec.task, spec.num_classes)
    shape = spec.input_shape if spec.input_shape is not None else tuple(int(s) for s in x_np.shape[1:])
    empty = np.zeros((0, *shape), np.float32)
    ds = Dataset(exp.run.dataset, empty, y_np[:0], empty, y_np[:0], spec.task, spec.num_classes, tuple(shape))
    model = make_model(exp, ds)
    x = torch.from_numpy(x_np)
    check_fit(model, x[:2], spec.task, max(spec.num_classes, 1), f"the file {str(path)!r}")
    return model, x, targets(torch.from_numpy(y_np), spec.task)


def _refuse_python(exp: Experiment) -> None:
    for key in ("model", "data"):
        if getattr(exp.run, key) == PYTHON:
            raise ConfigError(
                f"{key} = 'python': this run's {key} was a Python object handed to fedbayes.run(); rebuild it in your "
                f"script and call fedbayes.run(..., resume=True), or set {key} to an import path 'package.module:name'"
            )


def _user_or_builtin(exp: Experiment, shape: tuple[int, ...], outputs: int) -> nn.Module:
    """The run's model for examples of ``shape``: its import path's factory, or the built-in model."""
    run = exp.run
    if is_import_path(run.model):
        return build_user_model(run.model, shape, outputs, run.seed)
    kwargs: dict[str, Any] = {"hidden": run.hidden, "activation": run.activation} if run.model == "mlp" else {}
    return build_model(run.model, int(np.prod(shape)), outputs, seed=run.seed, input_shape=shape, **kwargs)


def make_model(exp: Experiment, data: Dataset) -> nn.Module:
    run = exp.run
    outputs = data.num_classes if data.task == "classification" else 1
    if is_import_path(run.model):
        return build_user_model(run.model, tuple(data.input_shape), outputs, run.seed)
    kwargs: dict[str, Any] = {}
    if run.model == "mlp":
        kwargs = {"hidden": run.hidden, "activation": run.activation}
    return build_model(run.model, data.num_features, outputs, seed=run.seed, input_shape=data.input_shape, **kwargs)
