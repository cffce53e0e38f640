"""A user's own data and model: tensors of any shape or a torch ``Dataset``, and ``package.module:name`` paths.

What a client's data may be (:data:`ClientData`)
------------------------------------------------
* ``(x, y)`` tensors (or NumPy arrays): ``x`` of shape (N, …) — any shape after the first axis, images stay
  images — and ``y`` of shape (N,): integer labels 0..C−1 (classification) or numbers (regression).  The trainer
  keeps them in memory and cuts seeded minibatches from them (:mod:`fedbayes.local`, the fast path).
* a map-style :class:`torch.utils.data.Dataset` (``__len__`` and ``__getitem__(i) -> (x, y)``), so transforms and
  augmentation work: it goes through a ``DataLoader`` whose batches follow the *same* seeded order as the tensor
  path (one ``randperm`` per epoch from the client's seed (seed, round, client)), so a Dataset that returns the
  same examples as a pair of tensors trains bit-identically.  Random transforms draw from torch's global
  generator, which the trainer seeds with the client's seed: augmentation is reproducible too.  Batches are
  loaded in the training process (``num_workers = 0``).  IVON's effective sample size is ``len(dataset)``.
  The batched client engine takes tensors only (``client-engine = auto`` falls back to sequential clients).

The test and validation sets may be either too; a Dataset test set is read once into tensors.

What an import path must give
-----------------------------
* ``model = "package.module:factory"``: a callable returning an ``nn.Module`` (a class is a callable).  It is
  called with those of the keyword arguments ``input_shape`` (one example's shape, a tuple),
  ``num_outputs`` / ``num_classes`` (classes, or 1 for regression) that its signature accepts (none at all is
  fine), with torch's generator seeded by the run's ``seed`` (the initialisation is reproducible).
* ``data = "package.module:function"``: a callable returning a :class:`FederatedData` (or any object with its
  attributes ``clients``, ``test`` and optionally ``validation``, ``task``, ``num_classes``).  It is called with
  those of ``seed`` and ``num_clients`` that its signature accepts.  The run key ``num-clients`` must equal the
  number of clients it returns; ``dataset`` and the partition keys are not used.

Every problem is a :class:`UserDataError` (a ``ValueError``) naming what is wrong: the module not found, the
attribute missing, a wrong return type, a client of the wrong form, and — one forward pass of two examples before
any training (:func:`check_fit`) — an input the model does not take or an output of the wrong shape, naming both.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset

__all__ = [
    "IMPORT_PATH", "ClientData", "FederatedData", "UserDataError", "as_tensors", "build_user_model", "check_fit",
    "client_sizes", "data_fingerprint", "example_batch", "import_object", "is_import_path", "load_client_file",
    "load_user_data", "model_signature", "normalise_client",
]

ClientData = Union[tuple[Tensor, Tensor], TorchDataset]  # noqa: UP007 (a runtime alias: X | Y fails on the class)
"""One client's examples: ``(x, y)`` tensors or a map-style torch ``Dataset`` of ``(x, y)`` pairs."""
Task = Literal["classification", "regression"]
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
"""``package.module:attribute`` (the attribute may be dotted: ``module:Class.factory``)."""


class UserDataError(ValueError):
    """A user's model, data or import path that cannot be used (the message says what and how to fix it)."""


@dataclass
class FederatedData:
    """What a ``data = "package.module:function"`` function returns, and what :func:`fedbayes.run` takes.

    Attributes
    ----------
    clients
        One :data:`ClientData` per client (client k is ``clients[k]``).
    test
        The test set (tensors or a Dataset), evaluated every ``eval-every`` rounds.
    validation
        An optional validation set (``eval-split = "validation"`` evaluates on it).
    task
        ``"classification"`` (cross-entropy; labels 0..C−1) or ``"regression"`` (Gaussian likelihood).
    num_classes
        Classes; None: 1 + the largest label of the tensors given (Dataset clients' labels are not scanned).
    """

    clients: Sequence[ClientData]
    test: ClientData
    validation: ClientData | None = None
    task: Task = "classification"
    num_classes: int | None = None


# --------------------------------------------------------------------------------------------- import paths
def is_import_path(value: str) -> bool:
    """Whether ``value`` looks like ``package.module:attribute``."""
    return bool(IMPORT_PATH.match(value))


def import_object(path: str, what: str) -> Any:
    """The object ``package.module:attribute`` names; ``what`` (e.g. ``"model"``) labels the errors.

    Raises
    ------
    UserDataError
        Not of that form, the module (or a module it imports) not found, or the attribute missing.
    """
    if not is_import_path(path):
        raise UserDataError(f"{what} = {path!r}: expected an import path 'package.module:name'")
    mod_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UserDataError(
                f"{what} = {path!r}: module '{e.name}' not found; is it on the Python path (the current folder, "
                "PYTHONPATH, or an installed package)?"
            ) from None
        raise UserDataError(f"{what} = {path!r}: importing '{mod_name}' failed: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise UserDataError(
                f"{what} = {path!r}: module '{mod_name}' has no attribute '{attr}' (it has: {', '.join(names[:20])})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserDataError(f"{what} = {path!r}: '{attr}' is a {type(obj).__name__}, not a callable")
    return obj


def _call_with(fn: Callable[..., Any], offered: Mapping[str, Any]) -> Any:
    """Call ``fn`` with the keyword arguments of ``offered`` its signature accepts (all of them with ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**offered)
    return fn(**{k: v for k, v in offered.items() if k in params})


def build_user_model(path: str, input_shape: tuple[int, ...], num_outputs: int, seed: int) -> nn.Module:
    """``factory(**accepted)`` of ``model = "package.module:factory"``, seeded (see the module docstring)."""
    factory = import_object(path, "model")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = _call_with(factory, {"input_shape": tuple(input_shape), "num_outputs": num_outputs,
                                     "num_classes": num_outputs})
    except TypeError as e:
        raise UserDataError(f"model = {path!r}: calling it failed: {e}") from None
    finally:
        torch.random.set_rng_state(state)
    if not isinstance(model, nn.Module):
        raise UserDataError(f"model = {path!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


# ------------------------------------------------------------------------------------------------ data
def normalise_client(c: Any, what: str) -> ClientData:
    """A client's data checked and in canonical form: ``(x, y)`` tensors (arrays converted) or a map Dataset."""
    if isinstance(c, IterableDataset):
        raise UserDataError(f"{what}: an IterableDataset has no length or index; give a map-style Dataset "
                            "(__len__ and __getitem__) or (x, y) tensors")
    if isinstance(c, TorchDataset) or (hasattr(c, "__getitem__") and hasattr(c, "__len__")
                                       and not isinstance(c, (tuple, list))):
        if _len(c) == 0:
            raise UserDataError(f"{what}: the Dataset is empty")
        return c  # type: ignore[no-any-return]
    if not isinstance(c, (tuple, list)) or len(c) != 2:
        raise UserDataError(f"{what}: expected (x, y) tensors or a map-style torch Dataset, got {type(c).__name__}")
    x, y = (torch.as_tensor(np.asarray(v)) if isinstance(v, np.ndarray) else v for v in c)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UserDataError(f"{what}: x and y must be tensors or NumPy arrays, got "
                            f"{type(c[0]).__name__} and {type(c[1]).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise UserDataError(f"{what}: x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserDataError(f"{what}: y must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                            f"got {tuple(y.shape)}")
    if x.dtype == torch.float64:
        x = x.float()
    return x, y


def _len(c: Any) -> int:
    return len(c)


def client_sizes(clients: Sequence[ClientData]) -> list[int]:
    return [int(c[0].shape[0]) if isinstance(c, tuple) else _len(c) for c in clients]


def example_batch(c: ClientData, n: int = 2) -> tuple[Tensor, Tensor]:
    """The first ``min(n, N)`` examples of a client as a batch (a Dataset's items collated)."""
    if isinstance(c, tuple):
        return c[0][:n], c[1][:n]
    from torch.utils.data import default_collate

    items = [c[i] for i in range(min(n, _len(c)))]
    try:
        xb, yb = default_collate(items)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserDataError(f"a Dataset item must be an (x, y) pair of tensors or numbers: {e}") from None
    return xb, torch.as_tensor(yb)


def as_tensors(c: ClientData, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of a client or test set (a Dataset read once, in order)."""
    if isinstance(c, tuple):
        return c
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for xb, yb in DataLoader(c, batch_size=batch_size, shuffle=False):
        xs.append(xb)
        ys.append(torch.as_tensor(yb))
    x = torch.cat(xs)
    return (x.float() if x.dtype == torch.float64 else x), torch.cat(ys)


def targets(y: Tensor, task: Task) -> Tensor:
    """Labels as int64 (classification) or float32 targets (regression)."""
    return y.long() if task == "classification" else y.float()


def check_fit(model: nn.Module, x: Tensor, task: Task, num_classes: int, what: str = "the data") -> None:
    """One forward pass of the batch ``x`` (a few examples) before any training.

    Raises
    ------
    UserDataError
        The model does not take inputs of ``x``'s shape, or its output is not (B, num_classes) for classification
        or (B,)/(B, 1) for regression; the message names the input and output shapes and the expected one.
    """
    name = type(model).__name__
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                x_cast = x.to(next(model.parameters()).dtype) if x.is_floating_point() else x
                out = model(x_cast)
            except Exception as e:  # any error of the user's forward on this shape
                takes = getattr(model, "input_shape", None)
                hint = f" (it takes examples of shape {tuple(takes)})" if takes is not None else ""
                raise UserDataError(
                    f"the model ({name}) does not take {what}: examples of shape {tuple(x.shape[1:])} (a batch "
                    f"{tuple(x.shape)}){hint}; its forward fails: {type(e).__name__}: {e}"
                ) from None
    finally:
        model.train(was)
    b = int(x.shape[0])
    want = (b, num_classes) if task == "classification" else (b, 1)
    got = tuple(out.shape) if isinstance(out, Tensor) else None
    ok = got == want or (task == "regression" and got == (b,))
    if not ok:
        why = f"output shape {got}" if got is not None else f"a {type(out).__name__}, not a tensor"
        need = (f"({b}, {num_classes}) for {num_classes} classes" if task == "classification"
                else f"({b},) or ({b}, 1) for regression")
        raise UserDataError(
            f"the model ({name}) does not fit {what}: a batch of inputs of shape {tuple(x.shape)} gives {why}, "
            f"but {need} is needed"
        )


def _label_max(clients: Sequence[ClientData], test: tuple[Tensor, Tensor]) -> int:
    ys = [c[1] for c in clients if isinstance(c, tuple)] + [test[1]]
    return int(max(int(y.max()) for y in ys if len(y))) + 1


def load_user_data(obj: Any, what: str = "data") -> FederatedData:
    """Check and normalise what a data function returned (or the objects given to :func:`fedbayes.run`)."""
    if not all(hasattr(obj, a) for a in ("clients", "test")):
        raise UserDataError(f"{what} returned a {type(obj).__name__}; expected a fedbayes.FederatedData (or an object "
                            "with attributes clients, test and optionally validation, task, num_classes)")
    clients = list(obj.clients)
    if not clients:
        raise UserDataError(f"{what}: no clients")
    task = getattr(obj, "task", "classification")
    if task not in ("classification", "regression"):
        raise UserDataError(f"{what}: task must be 'classification' or 'regression', got {task!r}")
    cs = [normalise_client(c, f"{what}: client {k}") for k, c in enumerate(clients)]
    test = normalise_client(obj.test, f"{what}: test set")
    val = getattr(obj, "validation", None)
    val = None if val is None else normalise_client(val, f"{what}: validation set")
    num_classes = getattr(obj, "num_classes", None)
    if task == "classification" and num_classes is None:
        num_classes = _label_max(cs, as_tensors(test))
    if task == "classification" and (not isinstance(num_classes, int) or num_classes < 1):
        raise UserDataError(f"{what}: num_classes must be a positive integer, got {num_classes!r}")
    return FederatedData(cs, test, val, "regression" if task == "regression" else "classification",
                         num_classes if task == "classification" else None)


def call_data_function(path: str, seed: int, num_clients: int) -> FederatedData:
    """``function(**accepted)`` of ``data = "package.module:function"``, checked (:func:`load_user_data`)."""
    fn = import_object(path, "data")
    try:
        out = _call_with(fn, {"seed": seed, "num_clients": num_clients})
    except TypeError as e:
        raise UserDataError(f"data = {path!r}: calling it failed: {e}") from None
    data = load_user_data(out, f"data = {path!r}")
    if len(data.clients) != num_clients:
        raise UserDataError(f"data = {path!r} returned {len(data.clients)} clients but num-clients = {num_clients}; "
                            f"set num-clients = {len(data.clients)}")
    return data


# ------------------------------------------------------------------------------------------------ identity
def model_signature(model: nn.Module) -> dict[str, Any]:
    """What identifies a model's layout: its class and each parameter's name and shape (recorded in
    ``config.json``'s provenance by :func:`fedbayes.run`; a resume with another layout is refused)."""
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "parameters": {k: list(p.shape) for k, p in model.named_parameters()}}


def _digest(c: ClientData) -> str:
    if not isinstance(c, tuple):
        return f"dataset:{type(c).__module__}.{type(c).__qualname__}:{_len(c)}"
    h = hashlib.sha256()
    for t in c:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(data: FederatedData) -> dict[str, Any]:
    """What identifies the data: the task, classes, each client's size and digest (SHA-256 of a tensor pair's
    dtype, shape and bytes; a Dataset's class and length: its items are not read), and the test set's."""
    return {"task": data.task, "num-classes": data.num_classes, "sizes": client_sizes(data.clients),
            "clients": [_digest(c) for c in data.clients], "test": _digest(data.test),
            "validation": None if data.validation is None else _digest(data.validation)}


# --------------------------------------------------------------------------------------------- node files
def load_client_file(path: Path, task: Task, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A deployed node's own ``.npz`` file (node config ``data-path``): ``x`` of shape (N, …) kept as it is (images
    stay images; float32), ``y`` (N,) labels in [0, num_classes) or regression targets.

    Raises
    ------
    ValueError
        Unreadable file, missing arrays, wrong shapes or dtypes, labels out of range; naming the path.
    """
    where = f"node config 'data-path' {str(path)!r}"
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "x" not in names or "y" not in names:
                raise ValueError(f"{where}: the file must hold arrays 'x' and 'y', it has {names}")
            x, y = np.asarray(z["x"]), np.asarray(z["y"])
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read it as a .npz file ({e})") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e})") from None
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{where}: 'x' must have shape (N, features...) with N >= 1, got {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{where}: 'x' must be numeric, got dtype {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: 'y' must have shape ({x.shape[0]},) to match 'x', got {y.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: 'x' contains NaN or Inf")
    if task == "classification":
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{where}: 'y' must hold integer class labels, got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"{where}: labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
        return x, y.astype(np.int64)
    if y.dtype.kind not in "fiu" or not np.isfinite(y).all():
        raise ValueError(f"{where}: 'y' must hold finite numbers for regression, got dtype {y.dtype}")
    return x, y.astype(np.float32)


def input_shape_of(c: ClientData) -> tuple[int, ...]:
    """One example's shape."""
    return tuple(int(s) for s in example_batch(c, 1)[0].shape[1:])


def prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))
