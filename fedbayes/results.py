"""The results folder of a run (DESIGN §6), written the same way by every engine.

``config.json``            the resolved flat configuration (``fedbayes run --config`` reproduces the run)
``metrics.jsonl``          one JSON object per evaluated round
``posterior.safetensors``  the final global ``mean/<param>`` (and ``prec/<param>`` for Bayesian rules), float64
``checkpoint/``            ``state.safetensors`` (the algorithm's server + per-client tensors) and ``meta.json``
                           (round, metrics so far, config, SHA-256 of the state file)

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a crash leaves
either the old or the new version, never half of one.  No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fedbayes.gaussian import DiagGaussian

__all__ = [
    "CheckpointError", "ResultsWriter", "atomic_write_bytes", "load_checkpoint", "read_metrics", "read_posterior",
]


NEXT_STATE = "state.next.safetensors"
"""The checkpoint's incoming state, renamed to ``state.safetensors`` once ``meta.json`` records its digest."""


class CheckpointError(ValueError):
    """A missing, truncated or corrupted checkpoint."""


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
    """Writes one run's folder; ``resume=True`` keeps what is there."""

    def __init__(self, out_dir: str | Path, config: Mapping[str, Any], *, resume: bool = False) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        if not resume:
            atomic_write_bytes(self.dir / "config.json", (json.dumps(self.config, indent=2) + "\n").encode())
            mpath = self.dir / "metrics.jsonl"
            if mpath.exists():
                mpath.unlink()

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(dict(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write_bytes(self.dir / "metrics.jsonl", data)

    def write_posterior(self, mean: Mapping[str, Tensor], posterior: DiagGaussian | None) -> None:
        tensors = {f"mean/{k}": v.double() for k, v in mean.items()}
        if posterior is not None:
            tensors.update({f"prec/{k}": v.double() for k, v in posterior.prec.items()})
        _atomic_save_tensors(self.dir / "posterior.safetensors", tensors)

    def write_checkpoint(self, server_round: int, state: Mapping[str, Tensor], metrics: list[dict[str, Any]],
                         extra: Mapping[str, Any] | None = None) -> None:
        """Write ``checkpoint/`` so that a kill at any instant leaves a loadable pair (state, meta).

        Order: the new state goes to ``state.next.safetensors`` (atomically), then ``meta.json`` with its SHA-256
        (atomically), then the state is renamed over ``state.safetensors``.  Killed before the meta: the old pair
        is intact.  Killed between the meta and the rename: :func:`load_checkpoint` finds the state whose digest
        the meta records in ``state.next.safetensors``.  (Replacing the state first, as before, left a new state
        under an old meta: a SIGKILL there made the run unresumable.)"""
        ck = self.dir / "checkpoint"
        ck.mkdir(exist_ok=True)
        nxt = ck / NEXT_STATE
        _atomic_save_tensors(nxt, state)
        meta = {
            "round": server_round,
            "config": self.config,
            "metrics": metrics,
            "state_sha256": _sha256(nxt),
            **(extra or {}),
        }
        atomic_write_bytes(ck / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
        os.replace(nxt, ck / "state.safetensors")


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify ``run_dir/checkpoint``; returns (meta, state tensors).

    Raises
    ------
    CheckpointError
        Missing files, unreadable JSON, a state file whose SHA-256 differs from the one recorded, or one that
        safetensors cannot parse (truncated).
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
    return meta, state


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def read_posterior(run_dir: str | Path) -> dict[str, Tensor]:
    return load_file(str(Path(run_dir) / "posterior.safetensors"))


