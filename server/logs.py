"""What the ServerApp prints: a few ``fedbayes:`` lines, no colour codes off a terminal, Flower's chatter on demand.

Flower logs through one ``flwr`` logger whose console handler (:data:`flwr.common.logger.console_handler`) colours
the level name with ANSI codes unconditionally and, at INFO, prints the strategy's banner, every round's metric
records and a final dump of all of them.  In a ServerApp that handler writes to the process's stdout, which Flower
streams to ``flwr run --stream`` (and to ``fedbayes run --engine flower``): about 90 lines for two rounds, every
metric three times, escape codes in a redirected file.  :func:`configure_server_logging` (called first thing in
:func:`server.app.main`) makes that handler

* **quiet** unless the run config says ``verbose = true`` (``fedbayes -v run --engine flower`` sets it): INFO
  records are shown only when they are fedbayes' own headline lines, whose message starts with
  :data:`HEADLINE` (the run, one line per round with its metrics, where the results are); warnings and errors
  always pass.  Everything else (Flower's banner and summaries, the strategy's tree, which node holds which
  partition) is still logged, only not shown;
* **colourless** when its stream is not a terminal or ``NO_COLOR`` is set (https://no-color.org).

The lines Flower prints before the ServerApp is loaded (the simulation's federation size, the CLI's own lines)
are out of the app's reach; ``fedbayes run --engine flower`` filters them itself
(:func:`simulations.processes.flwr_run`, ``verbose``).
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any

__all__ = ["HEADLINE", "HeadlineFilter", "colour_wanted", "configure_server_logging"]

HEADLINE = "fedbayes: "
"""Prefix of the INFO lines shown without ``verbose``."""


class HeadlineFilter(logging.Filter):
    """Pass warnings and errors, and INFO records whose message starts with :data:`HEADLINE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.getMessage().startswith(HEADLINE)


def colour_wanted(stream: IO[Any] | None) -> bool:
    """Colour codes only on a terminal, and never with ``NO_COLOR`` set (to anything non-empty)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def configure_server_logging(verbose: bool) -> None:
    """Set Flower's console handler up for a ServerApp run: colour only on a terminal (no ``NO_COLOR``), and with
    ``verbose`` False only the headline INFO lines (:class:`HeadlineFilter`).  Idempotent (a ServerApp process
    may run several runs)."""
    from flwr.common.logger import console_handler, update_console_handler

    update_console_handler(colored=colour_wanted(console_handler.stream))
    for f in [f for f in console_handler.filters if isinstance(f, HeadlineFilter)]:
        console_handler.removeFilter(f)
    if not verbose:
        console_handler.addFilter(HeadlineFilter())
