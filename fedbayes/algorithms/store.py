"""Where the server keeps each client's state: in memory, or one file per client with a bounded cache.

A rule reads and writes client k's state as named float64 tensors (``dual.eta/fc.weight``, …) through a
:class:`ClientStore`; the typed view is :meth:`fedbayes.algorithms.base.Algorithm.client`.  Two stores:

* :class:`MemoryStore` (``store = "memory"``, the default): a dict; for federations whose state fits in RAM.
* :class:`DiskStore` (``store = "disk"``): one safetensors file per client in a folder (:class:`ClientFiles`),
  an index client → (file, SHA-256), and an LRU cache of at most ``cache_bytes`` of decoded state, so memory is
  bounded whatever K is.

**Why files and not SQLite.**  Both were weighed for the disk store.  A write of a client's new state must cost
its bytes once: a new file, fsynced and renamed into place, does exactly that, while SQLite updates a blob
through its rollback journal or WAL, writing each changed page twice (the journal or WAL, then the database), and
a multi-megabyte blob spans hundreds of pages.  Files also need no locking, can be inspected with any safetensors
reader, and make the incremental checkpoint trivial: a file is never overwritten (each write gets a new name),
so the previous checkpoint's files stay valid until the new checkpoint's ``meta.json`` — which holds the index —
has replaced the old one (:meth:`fedbayes.results.ResultsWriter.write_checkpoint`).  The cost: one file per
client that ever took part (about 10⁵ files are comfortable on ext4; past that, see ``docs/scale.md``).

**Storage precision.**  ``dtype = float32`` (run key ``client-state-dtype``) keeps client state in float32,
halving it; reads return float64.  :meth:`ClientStore.put_all` returns the state *as stored*, so a rule's running
sums add exactly what a later recomputation from the store reads back (no drift from the rounding).

**Damage.**  Every file records its client and the run's fingerprint in its safetensors metadata and its SHA-256
in the index; a read checks all three and the shapes, and raises :class:`StoreError` naming the file and client.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ClientFiles", "ClientStore", "DiskStore", "MemoryStore", "StoreError", "state_dtype"]

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def state_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``client-state-dtype`` name (``float64`` or ``float32``)."""
    if name not in DTYPES:
        raise ValueError(f"client-state-dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


class StoreError(ValueError):
    """A client-state file that is missing, damaged, or from another run or model."""


def _stored(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to(device="cpu", dtype=dtype).contiguous().clone() for k, v in tensors.items()}


def _as_f64(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v if v.dtype == torch.float64 else v.to(torch.float64) for k, v in tensors.items()}


class ClientStore(ABC):
    """Per-client named tensors, read as float64 (``store.get_all(3)["site.eta/fc.weight"]``).

    Besides reads and writes, a store tracks which clients changed since the last checkpoint (:meth:`dirty`), so a
    checkpoint writes only those (:meth:`fedbayes.results.ResultsWriter.write_checkpoint`).
    """

    dtype: torch.dtype = torch.float64

    @abstractmethod
    def get_all(self, client: int) -> dict[str, Tensor]:
        """Client ``client``'s tensors (float64; empty for a client never written)."""

    @abstractmethod
    def put_all(self, client: int, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replace client ``client``'s tensors; returns them as a later :meth:`get_all` reads them (rounded to
        the store's dtype)."""

    @abstractmethod
    def delete(self, client: int) -> None:
        """Forget client ``client`` (no error when absent)."""

    @abstractmethod
    def clients(self) -> list[int]:
        """The clients with stored state, sorted."""

    def dirty(self) -> list[int]:
        """Clients written (or deleted) since :meth:`mark_clean`, sorted."""
        return sorted(self._dirty)

    def mark_clean(self) -> None:
        self._dirty.clear()

    def __init__(self) -> None:
        self._dirty: set[int] = set()


class MemoryStore(ClientStore):
    """Client state in a dict (``store = "memory"``)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.dtype = dtype
        self._d: dict[int, dict[str, Tensor]] = {}

    def get_all(self, client: int) -> dict[str, Tensor]:
        return _as_f64(self._d.get(client, {}))

    def put_all(self, client: int, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._d[client] = _stored(tensors, self.dtype)
        self._dirty.add(client)
        return _as_f64(self._d[client])

    def delete(self, client: int) -> None:
        if self._d.pop(client, None) is not None:
            self._dirty.add(client)

    def clients(self) -> list[int]:
        return sorted(self._d)


# ---------------------------------------------------------------------------------------------- files
FILE_PATTERN = "c*.safetensors"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, then the JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ClientFiles:
    """A folder of per-client safetensors files and the index client → (file name, SHA-256) that says which file
    is each client's current state.

    A write never overwrites: client k's new state goes to a new file ``c<k>-<session>-<seq>.safetensors``
    (written to a temporary name, fsynced, renamed), and the file it supersedes stays until :meth:`commit`, which
    the checkpoint calls once its ``meta.json`` (holding the new index) is durable.  So the folder always holds
    every file the last good checkpoint refers to.

    Parameters
    ----------
    folder
        The folder (created if absent).
    index
        The index to start from (a checkpoint's), client → [file name, SHA-256]; default empty.
    fingerprint
        The run's identity (:func:`fedbayes.results.run_fingerprint`), written into and checked against each
        file's metadata; empty: not checked.
    shapes
        Parameter name → shape; a file whose tensors have other shapes is refused.
    """

    def __init__(self, folder: str | Path, index: Mapping[int, tuple[str, str]] | None = None, *,
                 fingerprint: str = "", shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[int, tuple[str, str]] = {int(c): (str(n), str(h)) for c, (n, h) in (index or {}).items()}
        self.fingerprint = fingerprint
        self.shapes = dict(shapes) if shapes is not None else None
        self._session = secrets.token_hex(4)
        self._seq = 0
        self.bytes_written = 0

    def __contains__(self, client: int) -> bool:
        return client in self.index

    def path(self, client: int) -> Path:
        return self.folder / self.index[client][0]

    def write(self, client: int, tensors: Mapping[str, Tensor]) -> None:
        """Write client ``client``'s state to a new file and point the index at it.

        Raises
        ------
        StoreError
            The write failed (e.g. the disk is full); the index still points at the previous file.
        """
        from safetensors.torch import save

        self._seq += 1
        name = f"c{client:07d}-{self._session}-{self._seq:07d}.safetensors"
        meta = {"client": str(client), "run": self.fingerprint}
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
        path, tmp = self.folder / name, self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"writing client {client}'s state to {path} failed: {e}") from e
        self.index[client] = (name, _sha256_bytes(data))
        self.bytes_written += len(data)

    def read(self, client: int) -> dict[str, Tensor]:
        """Client ``client``'s tensors as stored (empty when not in the index), verified.

        Raises
        ------
        StoreError
            The file is missing, its SHA-256 differs from the index's, it belongs to another client or run, or its
            tensors do not have the model's shapes.
        """
        from safetensors.torch import load

        if client not in self.index:
            return {}
        name, digest = self.index[client]
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"client {client}'s state file {path} cannot be read: {e}") from None
        if _sha256_bytes(data) != digest:
            raise StoreError(f"client {client}'s state file {path} is damaged: its SHA-256 differs from the index's")
        try:
            tensors = load(data)
            meta = _metadata(data)
        except Exception as e:  # safetensors raises its own error types
            raise StoreError(f"client {client}'s state file {path} cannot be parsed: {e}") from None
        if meta.get("client") != str(client):
            raise StoreError(f"state file {path} holds client {meta.get('client')!r}, not client {client}")
        if self.fingerprint and meta.get("run") != self.fingerprint:
            raise StoreError(f"client {client}'s state file {path} belongs to another run or model "
                             f"(fingerprint {meta.get('run', '')[:12]!r}, expected {self.fingerprint[:12]!r})")
        if self.shapes is not None:
            for key, v in tensors.items():
                param = key.split("/", 1)[-1]
                if param not in self.shapes or tuple(v.shape) != self.shapes[param]:
                    raise StoreError(f"client {client}'s state file {path}: tensor {key!r} has shape "
                                     f"{tuple(v.shape)}, not the model's {self.shapes.get(param)}")
        return tensors

    def remove(self, client: int) -> None:
        """Drop ``client`` from the index (its file goes at the next :meth:`commit`)."""
        self.index.pop(client, None)

    def commit(self) -> None:
        """Delete every file of the folder the index does not name (superseded states, a crashed round's files,
        a former run's), and leftover temporary files.  Call only once the index is durable elsewhere."""
        keep = {n for n, _ in self.index.values()}
        for p in self.folder.glob(FILE_PATTERN):
            if p.name not in keep:
                p.unlink(missing_ok=True)
        for p in self.folder.glob(".c*.safetensors.tmp"):
            p.unlink(missing_ok=True)

    def sync(self) -> None:
        """Make the renames of the files written so far durable (fsync of the folder)."""
        _fsync_dir(self.folder)

    def index_json(self) -> dict[str, list[str]]:
        return {str(c): [n, h] for c, (n, h) in sorted(self.index.items())}


class DiskStore(ClientStore):
    """Client state on disk, one file per client (:class:`ClientFiles`), with an LRU cache of decoded state.

    Memory is bounded by ``cache_bytes`` whatever the number of clients; every :meth:`put_all` writes the client's
    file at once (so the state is on disk before any checkpoint refers to it).

    Parameters
    ----------
    files
        The folder and its index (a fresh folder, or a checkpoint's ``clients/`` with its index on resume).
    dtype
        Storage dtype (float64 or float32).
    cache_bytes
        The most bytes of decoded client state kept in memory (least recently used evicted first).
    """

    def __init__(self, files: ClientFiles | str | Path, dtype: torch.dtype = torch.float64,
                 cache_bytes: int = 512 << 20) -> None:
        super().__init__()
        self.files = files if isinstance(files, ClientFiles) else ClientFiles(files)
        self.dtype = dtype
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._cached = 0

    @property
    def root(self) -> Path:
        return self.files.folder

    @staticmethod
    def _size(tensors: Mapping[str, Tensor]) -> int:
        return sum(v.numel() * v.element_size() for v in tensors.values())

    def _remember(self, client: int, tensors: dict[str, Tensor]) -> None:
        self._forget(client)
        size = self._size(tensors)
        if size > self.cache_bytes:
            return
        self._cache[client] = tensors
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= self._size(old)

    def _forget(self, client: int) -> None:
        old = self._cache.pop(client, None)
        if old is not None:
            self._cached -= self._size(old)

    def get_all(self, client: int) -> dict[str, Tensor]:
        if client in self._cache:
            self._cache.move_to_end(client)
            return _as_f64(self._cache[client])
        if client not in self.files:
            return {}
        tensors = self.files.read(client)
        self._remember(client, tensors)
        return _as_f64(tensors)

    def put_all(self, client: int, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        stored = _stored(tensors, self.dtype)
        self.files.write(client, stored)
        self._remember(client, stored)
        self._dirty.add(client)
        return _as_f64(stored)

    def delete(self, client: int) -> None:
        self._forget(client)
        if client in self.files:
            self.files.remove(client)
            self._dirty.add(client)

    def clients(self) -> list[int]:
        return sorted(self.files.index)

    @property
    def cached_bytes(self) -> int:
        return self._cached
