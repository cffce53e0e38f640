"""TensorBoard event files for every run, written where every engine's results go (:class:`ResultsWriter`).

The run key ``tensorboard`` decides: ``"auto"`` (the default) logs when the ``tensorboard`` package is importable
(the optional extra ``pip install 'fedbayes[tensorboard]'``), ``true`` insists on it (a :class:`ConfigError` naming
the extra, before the results folder is touched, when it is missing), ``false`` never logs.  "auto" because the
event files cost nothing worth a switch (one small file per run, a few hundred bytes per round) and a person who
installed TensorBoard expects to see their runs in it; a person without it loses nothing and gets no error.

What a run writes in ``DIR/tensorboard/`` (:class:`RunLog`):

* every numeric field of every round's metrics row (the row ``metrics.jsonl`` gets: accuracy, NLL, ECE, Brier,
  ``bma_*``, ``train_loss``, ``bytes_up``/``bytes_down``, ``train_s``, ``wall_s``, ``guard_*``) as a scalar
  with step = round, under the row's own key (``test_accuracy``), plus ``participants`` and ``failed`` as counts;
* the hyperparameters, the resolved flat config (lists as comma-joined text, unset values as ``""``), as the
  HParams plugin's session start, so that the HParams tab lists every run with its settings and its final metrics
  (the plugin shows each scalar's last value).  No "experiment" summary is written: with one per run the plugin
  would take the first run's and hide the keys other rules have; without it, it gathers the hyperparameters of all
  sessions and the metrics from the scalar tags;
* the session's end (status success) once the configured last round is logged.

**Resume** continues the log: the event file opened for a resumed run starts with TensorBoard's purge marker at
the first round it logs (``SummaryWriter(purge_step=…)``), so a reader drops anything an interrupted run logged
from that round on (a crash between the metrics line and the checkpoint leaves one such round) and every round
appears once.  A fresh run in a folder removes the event files an earlier run left there, as it removes its
``metrics.jsonl``.

``fedbayes compare`` adds the comparison's ``table.md`` as text to ``COMPARE_DIR/tensorboard/``
(:func:`log_table`), so ``tensorboard --logdir runs/compare-x`` shows every run side by side with the table.

``torch.utils.tensorboard`` is imported only when a log is opened (never at ``import fedbayes``, never in a
ClientApp, which writes no results).
"""

from __future__ import annotations

import importlib.util
import json
import math
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EXTRA", "SUBDIR", "RunLog", "available", "clear_events", "hparam_values", "log_table", "wanted"]

SUBDIR = "tensorboard"
"""The event files' folder inside a results folder."""
EXTRA = "tensorboard"
"""The optional extra that installs the package: ``pip install 'fedbayes[tensorboard]'``."""
EVENTS_GLOB = "events.out.tfevents.*"


def available() -> bool:
    """Whether the ``tensorboard`` package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        return False


def wanted(setting: object) -> bool:
    """Whether a run with ``tensorboard = setting`` logs.

    Raises
    ------
    ConfigError
        ``setting`` is true but the package is missing (names the extra to install), or not "auto"/true/false.
    """
    from fedbayes.config import ConfigError

    if setting is False:
        return False
    if setting == "auto":
        return available()
    if setting is True:
        if not available():
            raise ConfigError(
                "tensorboard = true, but the 'tensorboard' package is not installed: install the optional extra "
                f"(pip install 'fedbayes[{EXTRA}]', or pip install tensorboard), or set tensorboard = \"auto\" "
                "(log when installed) or false")
        return True
    raise ConfigError(f"tensorboard must be \"auto\", true or false, got {setting!r}")


def clear_events(folder: Path) -> None:
    """Remove the event files in ``folder/tensorboard`` (a fresh run, or a rewritten table)."""
    for p in (Path(folder) / SUBDIR).glob(EVENTS_GLOB):
        p.unlink()


def hparam_values(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The flat config as HParams values (bool, number or text): lists comma-joined, None as ``""``."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in sorted(config.items()):
        if v is None:
            out[k] = ""
        elif isinstance(v, bool | int | float | str):
            out[k] = v
        elif isinstance(v, list | tuple):
            out[k] = ",".join(str(x) for x in v)
        else:
            out[k] = json.dumps(v, sort_keys=True, default=str)
    return out


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers (bools and the round itself left out); lists of clients as their counts."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out[k] = float(v)
        elif k in ("participants", "failed") and isinstance(v, list):
            out[k] = float(len(v))
    return out


class RunLog:
    """One run's event file, opened at the first round this process logs (``first_round``, the purge step).

    Parameters
    ----------
    folder
        The results folder; events go to ``folder/tensorboard``.
    config
        The resolved flat config (the hyperparameters; ``rounds`` says when the session ends).
    first_round
        The first round this log will hold: events an earlier log wrote from that round on are purged.
    """

    def __init__(self, folder: Path, config: Mapping[str, Any], first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = Path(folder) / SUBDIR
        self.rounds = int(config.get("rounds", 0) or 0)
        self.writer = SummaryWriter(str(self.dir), purge_step=int(first_round))
        _, ssi, _ = hparams(hparam_values(config), {})
        self.writer.file_writer.add_summary(ssi)  # type: ignore[attr-defined]  # set by __init__
        self._finalizer = weakref.finalize(self, self.writer.close)

    def add_round(self, row: Mapping[str, Any]) -> None:
        """Log a metrics row (step = its round); close the session after the configured last round."""
        step = int(row["round"])
        for k, v in _scalars(row).items():
            if math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        if self.rounds and step >= self.rounds:
            from torch.utils.tensorboard.summary import hparams

            _, _, sei = hparams({"rounds": self.rounds}, {})
            self.writer.file_writer.add_summary(sei)  # type: ignore[attr-defined]
            self.close()
        else:
            self.writer.flush()

    def close(self) -> None:
        self._finalizer()


def log_table(folder: Path, text: str, tag: str = "table") -> Path:
    """Write ``text`` (markdown, e.g. a comparison's ``table.md``) as the TensorBoard text ``tag`` into
    ``folder/tensorboard``, replacing what an earlier call wrote there; returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    clear_events(folder)
    out = Path(folder) / SUBDIR
    with SummaryWriter(str(out)) as w:
        w.add_text(tag, text, 0)
    return out
