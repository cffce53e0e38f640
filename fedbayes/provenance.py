"""What made a run: recorded in its ``config.json`` under the one reserved key :data:`PROVENANCE`.

Every results folder's ``config.json`` (:class:`fedbayes.results.ResultsWriter`: the in-process engine, the
ServerApp, the what-if commands that write a run) holds the resolved flat configuration plus::

    "provenance": {"fedbayes": "0.1.0", "git": {"commit": "…", "dirty": false}, "python": "3.11.9",
                   "torch": "2.…", "flwr": "1.42.0", "numpy": "…", "command": "fedbayes run …",
                   "date": "2026-…T…+00:00", "resumes": [{"date": …, "command": …, "from-round": 3, …}]}

Decisions:

* **One reserved top-level key**, not a second file: whoever copies ``config.json`` keeps its origin.  It is not
  a config key: :func:`fedbayes.config.load_config_file` drops it (so ``fedbayes run --config DIR/config.json``
  reproduces the run), the checkpoint's ``meta.json`` keeps the config without it (so resume's comparison and the
  client files' fingerprint never see it), and :func:`strip` removes it for any other reader.
* ``git`` only when the package sits in a git work tree (commit and whether tracked files differ from it); absent
  where git or the checkout is absent.  Git is never required and never fails a run (2 s time-out).
* ``flwr``'s version is read from the installed distribution's metadata: the library does not import Flower.
* A resumed run keeps the original provenance and appends one entry to ``resumes`` (date, command, the round
  the checkpoint held, and the versions of the resuming code, which may differ).
* ``command`` is the process's command line (``sys.argv``; for a library call, the calling script's).
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PROVENANCE", "provenance", "resume_entry", "strip"]

PROVENANCE = "provenance"
"""The reserved top-level key of ``config.json`` (not a configuration key)."""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _fedbayes_version() -> str:
    from fedbayes import __version__

    return _version("fedbayes") or __version__


@lru_cache(maxsize=1)
def _git() -> dict[str, Any] | None:
    """The commit of the checkout holding this package and whether tracked files differ; None without one."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=2,
                              check=True).stdout.strip()

    try:
        if git("rev-parse", "--is-inside-work-tree") != "true":
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a time-out
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("fedbayes", "__main__.py"):
        argv[0] = "fedbayes"
    return shlex.join(argv)


def _code() -> dict[str, Any]:
    out: dict[str, Any] = {"fedbayes": _fedbayes_version()}
    git = _git()
    if git is not None:
        out["git"] = dict(git)
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    """What is making a run now: code and library versions, the command line and the date (UTC); ``extra``
    (e.g. ``flower-run-id``) is added as given."""
    return {
        **_code(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "flwr": _version("flwr"),
        "numpy": _version("numpy"),
        "command": _command(),
        "date": _now(),
        **extra,
    }


def resume_entry(from_round: int, **extra: Any) -> dict[str, Any]:
    """One ``resumes`` entry: when and by what command a run was continued from its round ``from_round``."""
    return {"date": _now(), "command": _command(), "from-round": int(from_round), **_code(), **extra}


def strip(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` without the reserved :data:`PROVENANCE` key (a ``config.json`` as a configuration)."""
    return {k: v for k, v in flat.items() if k != PROVENANCE}
