"""The results folder of a run (DESIGN §6), written the same way by every engine.

``config.json``            the resolved flat configuration (``fedbayes run --config`` reproduces the run) and, under
                           the reserved key ``provenance``, what made it (:mod:`fedbayes.provenance`)
``metrics.jsonl``          one JSON object per evaluated round
``tensorboard/``           the same rows as TensorBoard scalars, and the config as hyperparameters (run key
                           ``tensorboard``, :mod:`fedbayes.tensorboard`)
``posterior.safetensors``  the final global ``mean/<param>`` (and ``prec/<param>`` for Bayesian rules), float64
``checkpoint/``            ``state.safetensors`` (the rule's global state and running sums), ``clients/`` (one
                           safetensors file per client that has state: :class:`fedbayes.algorithms.store.ClientFiles`)
                           and ``meta.json`` (round, metrics so far, config, SHA-256 of the state file, and the index
                           client → [file, SHA-256]); checkpoints of format 1 (every client's tensors inside
                           ``state.safetensors``, no index) are still read

**Incremental checkpoints** (format 2).  A round's checkpoint writes the global state and only the clients whose
state changed since the last one (:meth:`fedbayes.algorithms.store.ClientStore.dirty`), each to a new file; the
index in ``meta.json`` says which file is each client's.  ``meta.json`` is replaced last, atomically, and the files
it no longer names are deleted only after that, so a kill at any instant leaves the previous or the new checkpoint
whole.  With ``store = "disk"`` the client store *is* ``checkpoint/clients/`` (its writes are the checkpoint's).

**No silent overwrite.**  A folder that holds a run (:func:`holds_run`: ``config.json``, ``metrics.jsonl`` or
``checkpoint/``) is refused by :func:`check_new_run` with :class:`RunExistsError` unless the caller asks to
overwrite; then :func:`clear_run` removes that run's files (only the files a run writes) before the new run
starts, so no stale checkpoint or client file of the old run survives beside the new one.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a crash leaves
either the old or the new version, never half of one.  No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fedbayes.algorithms.store import ClientFiles, ClientStore, DiskStore, MemoryStore, StoreError
from fedbayes.gaussian import DiagGaussian
from fedbayes.provenance import PROVENANCE, strip
from fedbayes.provenance import provenance as made_now

if TYPE_CHECKING:
    from fedbayes.algorithms.base import Algorithm

__all__ = [
    "CHECKPOINT_FORMAT", "CheckpointError", "ResultsWriter", "RunExistsError", "atomic_write_bytes", "check_new_run",
    "checkpoint_files", "clear_run", "holds_run", "load_checkpoint", "read_metrics", "read_posterior",
    "run_fingerprint",
]

CHECKPOINT_FORMAT = 2
"""2: global state in ``state.safetensors``, clients in ``clients/`` with an index in ``meta.json``; 1: all in one
file (still read)."""
CLIENTS = "clients"
"""The checkpoint's per-client folder (also the live folder of ``store = "disk"``)."""
FINGERPRINT_KEYS = ("algorithm", "dataset", "train-fraction", "model", "hidden", "activation", "num-clients",
                    "partition", "seed")
"""The run keys that say what a client file means: the rule, the model, and which federation (a later version's new
keys, ``rounds`` extended on resume, or a changed learning rate do not make earlier files foreign)."""


def run_fingerprint(config: Mapping[str, Any]) -> str:
    """The identity of a run's client state: SHA-256 of :data:`FINGERPRINT_KEYS` of its flat config (written into
    each client file, so a file from another run or model is refused, naming the file and client)."""
    keep = {k: config.get(k) for k in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_files(run_dir: str | Path, config: Mapping[str, Any], index: Mapping[str, Any] | None = None,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> ClientFiles:
    """The :class:`ClientFiles` of ``run_dir/checkpoint/clients`` with ``index`` (a meta.json's ``clients``)."""
    idx = {int(c): (str(v[0]), str(v[1])) for c, v in (index or {}).items()}
    return ClientFiles(Path(run_dir) / "checkpoint" / CLIENTS, idx, fingerprint=run_fingerprint(config),
                       shapes=shapes)


NEXT_STATE = "state.next.safetensors"
"""The checkpoint's incoming state, renamed to ``state.safetensors`` once ``meta.json`` records its digest."""


class CheckpointError(ValueError):
    """A missing, truncated or corrupted checkpoint."""


class RunExistsError(ValueError):
    """The results folder already holds a run, and the caller did not ask to overwrite it."""


RUN_FILES = ("config.json", "metrics.jsonl", "posterior.safetensors", "split.json", "FAILED.txt")
"""The files a run writes into its folder (besides ``checkpoint/``): what :func:`clear_run` removes."""


def holds_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds (part of) a run: ``config.json``, ``metrics.jsonl`` or ``checkpoint/``."""
    p = Path(folder)
    return (p / "config.json").exists() or (p / "metrics.jsonl").exists() or (p / "checkpoint").exists()


def check_new_run(folder: str | Path, overwrite: bool = False, *, flag: str = "overwrite=True") -> None:
    """Refuse to start a new run in a folder that holds one (``overwrite``: remove that run first).

    Raises
    ------
    RunExistsError
        ``folder`` holds a run and ``overwrite`` is False; the message says how to continue it (``--resume``),
        replace it (``flag``) or write elsewhere.  Nothing is touched.
    """
    p = Path(folder)
    if not holds_run(p):
        return
    if not overwrite:
        what = _describe(p)
        raise RunExistsError(
            f"{p} already holds a run ({what}). Use `fedbayes run --resume {p}` to continue it, {flag} to replace "
            "it, or another output folder. Nothing was written")
    clear_run(p)


def _describe(p: Path) -> str:
    bits = []
    try:
        cfg = json.loads((p / "config.json").read_text())
        bits.append(f"{cfg.get('algorithm')} on {cfg.get('dataset')}, {cfg.get('rounds')} rounds")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        done = json.loads((p / "checkpoint" / "meta.json").read_text())["round"]
        bits.append(f"checkpoint of round {done}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "; ".join(bits) or "config.json, metrics.jsonl or checkpoint/"


def clear_run(folder: str | Path) -> None:
    """Remove the run in ``folder``: :data:`RUN_FILES` and ``checkpoint/`` (nothing else in the folder)."""
    import shutil

    p = Path(folder)
    for name in RUN_FILES:
        (p / name).unlink(missing_ok=True)
    if (p / "checkpoint").is_dir():
        shutil.rmtree(p / "checkpoint")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ResultsWriter:
    """Writes one run's folder; ``resume=True`` keeps what is there (and the checkpoint's client index).

    A new run's ``config.json`` is ``config`` plus ``provenance`` (default: :func:`fedbayes.provenance.provenance`
    now); :attr:`config` (what the checkpoint records) is ``config`` alone."""

    def __init__(self, out_dir: str | Path, config: Mapping[str, Any], *, resume: bool = False,
                 provenance: Mapping[str, Any] | None = None) -> None:
        from fedbayes import tensorboard

        self._tensorboard = tensorboard.wanted(config.get("tensorboard", "auto"))  # ConfigError: nothing touched
        self._tb_log: tensorboard.RunLog | None = None
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = strip(config)
        self.last_checkpoint_bytes = 0
        """Bytes the last :meth:`write_checkpoint` wrote (global state, changed clients, meta)."""
        index = None
        if not resume:
            made = dict(provenance) if provenance is not None else made_now()
            text = json.dumps({**self.config, PROVENANCE: made}, indent=2) + "\n"
            atomic_write_bytes(self.dir / "config.json", text.encode())
            mpath = self.dir / "metrics.jsonl"
            if mpath.exists():
                mpath.unlink()
            tensorboard.clear_events(self.dir)  # an earlier run's event log goes with its metrics
        else:
            meta_p = self.dir / "checkpoint" / "meta.json"
            if meta_p.exists():
                index = json.loads(meta_p.read_text()).get("clients")
        self._files: ClientFiles | None = None
        self._index = index

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoint"

    def client_folder(self) -> Path:
        """``checkpoint/clients``: where the checkpoint's client files live (``store = "disk"`` stores there)."""
        return self.checkpoint_dir / CLIENTS

    def _own_files(self) -> ClientFiles:
        if self._files is None:
            self._files = checkpoint_files(self.dir, self.config, self._index)
        return self._files

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` and, with ``tensorboard`` on, to the event log
        (:mod:`fedbayes.tensorboard`: opened at the first row, which is also its purge step on resume)."""
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(dict(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._tensorboard:
            if self._tb_log is None:
                from fedbayes.tensorboard import RunLog

                self._tb_log = RunLog(self.dir, self.config, int(row["round"]))
            self._tb_log.add_round(row)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write_bytes(self.dir / "metrics.jsonl", data)

    def write_posterior(self, mean: Mapping[str, Tensor], posterior: DiagGaussian | None) -> None:
        tensors = {f"mean/{k}": v.double() for k, v in mean.items()}
        if posterior is not None:
            tensors.update({f"prec/{k}": v.double() for k, v in posterior.prec.items()})
        _atomic_save_tensors(self.dir / "posterior.safetensors", tensors)

    def write_checkpoint(self, server_round: int, state: Algorithm | Mapping[str, Tensor],
                         metrics: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
        """Write ``checkpoint/`` incrementally so that a kill at any instant leaves a loadable checkpoint.

        ``state`` is the rule (its global state, and the clients its store marks dirty) or a flat
        ``server/…`` + ``client/<k>/…`` mapping (every client written).  Order: the changed clients' files (new
        names, fsynced), the global state to ``state.next.safetensors`` (atomically), then ``meta.json`` with the
        state's SHA-256 and the client index (atomically), then the state is renamed over ``state.safetensors``
        and the files the index no longer names are deleted.  Killed before the meta: the old checkpoint is
        intact (its files were not touched).  Killed between the meta and the rename: :func:`load_checkpoint`
        finds the state whose digest the meta records in ``state.next.safetensors``.

        Raises
        ------
        CheckpointError
            A write failed (e.g. a full disk): the message names the file (and client); the previous checkpoint
            is left as it was.
        """
        from fedbayes.algorithms.base import Algorithm, split_clients

        ck = self.checkpoint_dir
        ck.mkdir(exist_ok=True)
        store: ClientStore
        if isinstance(state, Algorithm):
            server, store = state.server_tensors(), state.store
        else:
            server = {k: v for k, v in state.items() if k.startswith("server/")}
            store = MemoryStore()
            for c, d in split_clients(state).items():
                store.put_all(c, d)
        live = isinstance(store, DiskStore) and store.root.resolve() == self.client_folder().resolve()
        files = store.files if isinstance(store, DiskStore) and live else self._own_files()
        written0 = files.bytes_written
        prev = self._last_round()
        try:
            if not live:
                for c in store.dirty():
                    t = store.get_all(c)
                    if t:
                        files.write(c, {k: v.to(store.dtype) for k, v in t.items()})
                    else:
                        files.remove(c)
            files.sync()
            nxt = ck / NEXT_STATE
            _atomic_save_tensors(nxt, server)
            meta = {
                "format": CHECKPOINT_FORMAT,
                "round": server_round,
                "config": self.config,
                "metrics": metrics,
                "state_sha256": _sha256(nxt),
                "client_dtype": str(store.dtype).removeprefix("torch."),
                "clients": files.index_json(),
                **(extra or {}),
            }
            blob = (json.dumps(meta, indent=1) + "\n").encode()
            atomic_write_bytes(ck / "meta.json", blob)
        except (OSError, StoreError) as e:
            kept = f"the checkpoint of round {prev} is intact" if prev else "no earlier checkpoint exists"
            raise CheckpointError(f"writing the checkpoint of round {server_round} failed: {e}; {kept}") from e
        os.replace(nxt, ck / "state.safetensors")
        files.commit()
        store.mark_clean()
        self.last_checkpoint_bytes = (files.bytes_written - written0 + (ck / "state.safetensors").stat().st_size
                                      + len(blob))

    def _last_round(self) -> int | None:
        try:
            return int(json.loads((self.checkpoint_dir / "meta.json").read_text())["round"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def load_checkpoint(run_dir: str | Path, *, clients: bool = True,
                    shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify ``run_dir/checkpoint``; returns (meta, state tensors).

    The state holds ``server/…`` and, with ``clients=True``, every client's ``client/<k>/…`` tensors (read from
    ``clients/`` and verified against the index for format 2).  ``clients=False`` checks only that every indexed
    file exists (a resumed ``store = "disk"`` run reads them as it needs them, verifying each).

    Raises
    ------
    CheckpointError
        Missing files, unreadable JSON, a state file whose SHA-256 differs from the one recorded, or one that
        safetensors cannot parse (truncated); a client file that is missing, damaged or from another run (named
        with its client).
    """
    ck = Path(run_dir) / "checkpoint"
    meta_p, state_p = ck / "meta.json", ck / "state.safetensors"
    if not meta_p.exists() or not state_p.exists():
        raise CheckpointError(f"no checkpoint in {ck} (expected meta.json and state.safetensors)")
    try:
        meta = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {meta_p} is corrupted: {e}") from None
    if not isinstance(meta, dict) or not {"round", "config", "metrics", "state_sha256"} <= set(meta):
        raise CheckpointError(f"checkpoint {meta_p} lacks round/config/metrics/state_sha256")
    digest = _sha256(state_p)
    nxt = ck / NEXT_STATE
    if digest != meta["state_sha256"] and nxt.exists() and _sha256(nxt) == meta["state_sha256"]:
        state_p, digest = nxt, meta["state_sha256"]  # killed between the meta and the rename (write_checkpoint)
    if digest != meta["state_sha256"]:
        raise CheckpointError(
            f"checkpoint {state_p} is corrupted or truncated: SHA-256 {digest[:12]}… != recorded "
            f"{str(meta['state_sha256'])[:12]}…"
        )
    try:
        state = load_file(str(state_p))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {state_p} cannot be read: {e}") from None
    index = meta.get("clients")
    if index is None:
        return meta, state
    if not isinstance(index, dict) or not all(
            str(c).isdigit() and isinstance(v, list) and len(v) == 2 for c, v in index.items()):
        raise CheckpointError(f"checkpoint {meta_p}: its client index is malformed")
    files = checkpoint_files(run_dir, meta["config"], index, shapes)
    for c in sorted(files.index):
        if not files.path(c).is_file():
            raise CheckpointError(f"checkpoint {ck}: client {c}'s state file {files.path(c)} is missing")
        if clients:
            try:
                state.update({f"client/{c}/{k}": v for k, v in files.read(c).items()})
            except StoreError as e:
                raise CheckpointError(f"checkpoint {ck}: {e}") from None
    return meta, state


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` ([] when there is none).

    Raises
    ------
    ValueError
        A line that is not a JSON object, naming the file, the line number and what to do.
    """
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}, line {i}: not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}; "
                             "repair or delete that line, or delete the run folder to run it again") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}, line {i}: expected a JSON object (one round's metrics), got {line[:80]!r}")
        rows.append(row)
    return rows


def read_posterior(run_dir: str | Path) -> dict[str, Tensor]:
    return load_file(str(Path(run_dir) / "posterior.safetensors"))


