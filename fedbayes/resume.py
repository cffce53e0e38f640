"""Resume a run from its results folder's checkpoint: the one implementation for every engine.

The in-process engine (``fedbayes run --resume``, :func:`fedbayes.engine.run_experiment` with ``resume=True``)
and the ServerApp (run-config key ``resume-from``, also what ``fedbayes run --resume --engine flower`` sets)
continue exactly where the checkpoint stopped, so a run resumed by either engine ends bit-identical to an
uninterrupted one (every seed, the participants and the learning-rate schedule are functions of the absolute
round):

* :func:`load_resume` reads and verifies ``<folder>/checkpoint`` (:func:`fedbayes.results.load_checkpoint`) and,
  given the experiment a run config describes (Flower), compares it with the checkpoint's config, **before
  anything is written**: a missing, truncated or
  corrupted checkpoint raises :class:`fedbayes.results.CheckpointError`, a run config that describes another
  experiment raises :class:`fedbayes.config.ConfigError` naming the keys; the folder is left as it was.
* Only :data:`MAY_CHANGE` may differ: ``rounds`` (the run may be extended; the larger of the run config's and the
  checkpoint's count wins, as in the engine), ``round-timeout`` and ``store-cache-mb`` (deployment settings).
  Every other key must equal the checkpoint's, because the ClientApps rebuild their data and model from the run
  config they are given.
* The command line uses the same comparison (:func:`load_resume` with ``exp`` = the checkpoint's config with the
  explicit options on top, and ``advice`` saying how to start a new run from the old config instead).
* :func:`prepare_folder` then cuts ``metrics.jsonl`` back to the checkpoint's rows (a crash between the metrics
  append and the checkpoint write leaves one row too many) and rewrites ``config.json`` with the new ``rounds``,
  keeping its ``provenance`` (what made the run) and appending one ``resumes`` entry
  (:func:`fedbayes.provenance.resume_entry`).

The ServerApp offsets Flower's round counter (``Strategy.start`` always counts from 1) by the checkpoint's round:
see :class:`server.strategy.FedBayesStrategy` (``start_round``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from fedbayes.algorithms import Algorithm
from fedbayes.algorithms.store import DiskStore, StoreError
from fedbayes.config import ConfigError, Experiment, resolve
from fedbayes.provenance import PROVENANCE, resume_entry
from fedbayes.results import CheckpointError, ResultsWriter, atomic_write_bytes, checkpoint_files, load_checkpoint

__all__ = ["MAY_CHANGE", "Resume", "changed_keys", "load_resume", "prepare_folder", "refuse_changes"]

MAY_CHANGE = ("rounds", "round-timeout", "store-cache-mb")
"""Run keys a resumed run may set differently from the checkpoint's config."""


@dataclass(frozen=True)
class Resume:
    """A verified checkpoint, ready to continue.

    Attributes
    ----------
    folder
        The results folder (absolute); the resumed run writes here.
    exp
        The experiment to continue: the checkpoint's config with the run config's ``rounds`` (if larger) and
        ``round-timeout``.
    done
        The last round the checkpoint holds; the run continues from ``done + 1``.
    rows
        The metrics rows of rounds ``1..done``.
    state
        The server rule's tensors (:meth:`fedbayes.algorithms.base.Algorithm.load_state_tensors`).
    """

    folder: Path
    exp: Experiment
    done: int
    rows: list[dict[str, Any]]
    state: dict[str, Tensor]
    clients: dict[str, Any] | None = None
    """The checkpoint's client index (format 2: client files in ``checkpoint/clients``); None: format 1, the
    clients' tensors are in ``state``."""

    def load_into(self, rule: Algorithm) -> None:
        """Give ``rule`` the checkpoint's state: the global state, and the clients' — adopted in place when the
        rule's store is this folder's ``checkpoint/clients`` (``store = "disk"``: read lazily, each file verified
        when read), else read (verified) into its store.  Nothing is written.

        Raises
        ------
        CheckpointError
            A client file is damaged or belongs to another run or model (the message names file and client).
        """
        if self.clients is None:  # format 1: every client inside the state file; written out at the next checkpoint
            rule.load_state_tensors(self.state)
            return
        rule.load_server_tensors(self.state)
        shapes = {k: tuple(s) for k, s in rule.shapes.items()}
        files = checkpoint_files(self.folder, self.exp.to_flat(), self.clients, shapes)
        store = rule.store
        if isinstance(store, DiskStore) and store.root.resolve() == files.folder.resolve():
            store.files.index = dict(files.index)
            store.files.shapes = shapes
        else:
            for c in sorted(files.index):
                try:
                    store.put_all(c, files.read(c))
                except StoreError as e:
                    raise _fail(self.folder, str(e)) from None
        store.mark_clean()

    @property
    def start_round(self) -> int:
        """The first round the resumed run trains."""
        return self.done + 1


def _fail(folder: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot resume from {folder}: {why}. Nothing was written; the folder is as it was")


def changed_keys(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """The flat keys in which ``want`` differs from the checkpoint's ``have``, but for :data:`MAY_CHANGE`."""
    return sorted(k for k in set(want) | set(have) if k not in MAY_CHANGE and want.get(k) != have.get(k))


def refuse_changes(folder: Path, want: dict[str, Any], have: dict[str, Any], advice: str | None = None) -> None:
    """Raise :class:`ConfigError` naming every key (new and checkpoint value) in which the flat ``want`` differs
    from the checkpoint's ``have`` but for :data:`MAY_CHANGE`; ``advice`` says how to proceed."""
    differ = changed_keys(want, have)
    if differ:
        shown = ", ".join(f"{k}={want.get(k)!r} (checkpoint: {have.get(k)!r})" for k in differ)
        how = advice or f"Pass the original run's config; only {list(MAY_CHANGE)} may change"
        raise ConfigError(
            f"resuming {folder}: the run config describes another experiment than the checkpoint's: {shown}. "
            f"{how}. Nothing was written"
        )


def load_resume(folder: Path, exp: Experiment | None = None, *, rounds: int | None = None,
                advice: str | None = None) -> Resume:
    """Read and verify ``folder/checkpoint`` and check ``exp`` (from the run config) against it.

    Parameters
    ----------
    folder
        The results folder of the run to continue.
    exp
        The experiment a run config describes (the ServerApp's ``resume-from``): it must equal the checkpoint's
        but for :data:`MAY_CHANGE`.  None (the in-process engine, the CLI): the checkpoint's config is the run.
    rounds
        With ``exp`` None: extend the run to this many rounds (the larger of it and the checkpoint's count).
    advice
        What the refusal of another experiment tells the user to do (default: pass the original run's config).

    Raises
    ------
    CheckpointError
        No such folder, a missing, truncated or corrupted checkpoint, or one whose metadata is inconsistent.
    ConfigError
        The run config differs from the checkpoint's config in a key other than :data:`MAY_CHANGE`; the message
        names every such key with both values.
    """
    folder = folder.resolve()
    if not folder.is_dir():
        raise _fail(folder, "no such results folder")
    try:
        meta, state = load_checkpoint(folder, clients=False)
    except CheckpointError as e:
        raise _fail(folder, str(e)) from None
    done, rows = meta["round"], meta["metrics"]
    if isinstance(done, bool) or not isinstance(done, int) or done < 1:
        raise _fail(folder, f"checkpoint/meta.json has round {done!r}, expected a round >= 1")
    if not isinstance(rows, list) or len(rows) != done or not all(isinstance(r, dict) for r in rows):
        raise _fail(folder, f"checkpoint/meta.json holds {len(rows) if isinstance(rows, list) else rows!r} metrics "
                            f"rows for round {done}")
    if [r.get("round") for r in rows] != list(range(1, done + 1)):
        raise _fail(folder, "checkpoint/meta.json metrics rows are not rounds 1..round")
    try:
        saved = resolve(meta["config"])
    except ConfigError as e:
        raise _fail(folder, f"its config is not valid: {e}") from None
    have = saved.to_flat()
    if exp is None:
        total = max(int(rounds or 0), saved.run.rounds)
        return Resume(folder, resolve({**have, "rounds": total}), done, [dict(r) for r in rows], state,
                      meta.get("clients"))
    refuse_changes(folder, exp.to_flat(), have, advice)
    cont = resolve({**have, "rounds": max(exp.run.rounds, saved.run.rounds), "round-timeout": exp.run.round_timeout,
                    "store-cache-mb": exp.run.store_cache_mb})
    return Resume(folder, cont, done, [dict(r) for r in rows], state, meta.get("clients"))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def prepare_folder(resume: Resume, provenance: dict[str, Any] | None = None) -> ResultsWriter:
    """The writer of the resumed run: ``metrics.jsonl`` cut back to the checkpoint's rows, ``config.json`` with the
    continued experiment (as the engine's resume does), its provenance kept and a ``resumes`` entry appended
    (``provenance``: extra fields of that entry, e.g. ``flower-run-id``)."""
    writer = ResultsWriter(resume.folder, resume.exp.to_flat(), resume=True)
    writer.rewrite_metrics(resume.rows)
    made = _old_provenance(resume.folder)
    made["resumes"] = [*made.get("resumes", []), resume_entry(resume.done, **(provenance or {}))]
    _atomic_write_text(resume.folder / "config.json", json.dumps({**writer.config, PROVENANCE: made}, indent=2) + "\n")
    return writer


def _old_provenance(folder: Path) -> dict[str, Any]:
    """The provenance the folder's ``config.json`` records ({} if none: a run made before it was recorded)."""
    try:
        made = json.loads((folder / "config.json").read_text()).get(PROVENANCE)
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(made, dict):
        return {}
    if not isinstance(made.get("resumes", []), list):
        made["resumes"] = []
    return made
