"""Real processes for Flower runs and tests: start them with their own logs, find their descendants through
``/proc``, stop them **by PID** (SIGTERM, then SIGKILL), wait for a health endpoint; ``flwr`` CLI homes, free
ports and SuperNode key pairs; and ``flwr run`` itself (:func:`flwr_run`), whose echoed output
:class:`EchoFilter` keeps short and colourless off a terminal."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "EchoFilter",
    "FlowerRunError",
    "Proc",
    "alive",
    "descendants",
    "flower_bin",
    "flower_env",
    "flwr_run",
    "free_port",
    "make_supernode_key",
    "start_process",
    "stop_process",
    "wait_healthy",
    "write_flwr_home",
]


class FlowerRunError(RuntimeError):
    """A Flower run that did not finish; the message carries the tail of its logs."""


def make_supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair for SuperNode authentication, in the OpenSSH formats Flower reads.

    ``folder/name`` (private key, OpenSSH PEM, mode 600: ``flower-supernode --auth-supernode-private-key``) and
    ``folder/name.pub`` (``ecdsa-sha2-nistp384 …``: ``flwr supernode register``); the same as
    ``ssh-keygen -t ecdsa -b 384 -N "" -f folder/name``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return priv, pub


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private ``FLWR_HOME``, no update check, no runtime ``uv sync``, the
    venv's ``bin`` first on ``PATH`` (the SuperLink and SuperNodes start ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def write_flwr_home(flwr_home: Path, connections: Mapping[str, Mapping[str, Any]], default: str) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with the given SuperLink connections (``address``, ``insecure`` or
    ``root-certificates``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{default}"', ""]
    for name, conn in connections.items():
        lines.append(f"[superlink.{name}]")
        for k, v in conn.items():
            lines.append(f"{k} = {'true' if v is True else 'false' if v is False else repr(str(v))}")
        lines.append("")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines).replace("'", '"'))
    return path


# ------------------------------------------------------------------------------------------ processes
def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        out[int(d)] = int(rest[1])
    return out


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (children first), read from /proc."""
    ppids = _ppid_map()
    kids: dict[int, list[int]] = {}
    for p, pp in ppids.items():
        kids.setdefault(pp, []).append(p)
    out: list[int] = []
    todo = list(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Proc:
    """A process we started, its log file and the descendants seen while it ran."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    seen: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def snapshot(self) -> None:
        self.seen.update(descendants(self.pid))

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_process(name: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path,
                  cwd: Path | None = None) -> Proc:
    """Start ``args`` in its own session with stdout+stderr to ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    fh: IO[bytes] = open(log_path, "wb")
    try:
        popen = subprocess.Popen(list(args), env=dict(env), stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                 start_new_session=True)
    finally:
        fh.close()
    return Proc(name, popen, log_path)


def stop_process(proc: Proc, timeout: float = 15.0) -> None:
    """Stop ``proc`` and every descendant it had (seen now or earlier), by PID: SIGTERM, then SIGKILL."""
    proc.snapshot()
    family = [p for p in proc.seen if p != proc.pid]
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.2)  # SuperExec and its tasks exit on their own once their parent is gone
    for p in family:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_healthy(url: str, proc: Proc | None = None, timeout: float = 60.0,
                 verify: ssl.SSLContext | bool = True) -> None:
    """Poll ``url`` (a Flower ``/health`` endpoint) until it answers 200.

    Raises
    ------
    FlowerRunError
        ``proc`` exited, or no answer within ``timeout``.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise FlowerRunError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            if httpx.get(url, timeout=2.0, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise FlowerRunError(f"{url} not healthy after {timeout:.0f} s" + (f":\n{proc.log_tail()}" if proc else ""))


def flwr_run(app_dir: Path, connection: str, env: Mapping[str, str], log_path: Path, *,
             run_config: Path | None = None, federation_config: str | None = None,
             timeout_s: float | None = None, echo: bool = False, extra_args: Sequence[str] = (),
             verbose: bool = True) -> int:
    """``flwr run APP CONNECTION [--run-config FILE] [--federation-config …] --stream``; returns its exit code.

    The output goes, whole, to ``log_path``; with ``echo`` also to stdout, without colour codes unless stdout is
    a terminal (and ``NO_COLOR`` is unset), and with ``verbose=False`` only fedbayes' headline lines, warnings and
    errors (:class:`EchoFilter`).  On timeout the command is stopped by PID.
    """
    args = [flower_bin("flwr"), "run", str(app_dir), connection, "--stream"]
    if run_config is not None:
        args += ["--run-config", str(run_config)]
    if federation_config:
        args += ["--federation-config", federation_config]
    args += list(extra_args)
    proc = start_process(log_path.stem, args, env, log_path.parent, cwd=app_dir)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = EchoFilter(verbose=verbose, colour=_colour_ok(sys.stdout)) if echo else None
    try:
        while proc.popen.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise FlowerRunError(f"flwr run did not finish within {timeout_s:.0f} s:\n{proc.log_tail()}")
            time.sleep(0.5)
            if shown is not None:
                shown.follow(log_path)
    finally:
        stop_process(proc, timeout=10.0)
        if shown is not None:
            shown.follow(log_path, final=True)
    return int(proc.popen.returncode)


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
"""An ANSI escape sequence (colours: ``ESC[92m``, ``ESC[0m``)."""
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s+")
"""The level prefix of a line from Flower's console handler (``INFO :      message``)."""
FLOWER_NOISE = ("Since flwr 1.32, default simulated SuperNodes changed",)
"""Flower warnings printed on every run that say nothing about this one (the federation size is always given)."""


def _colour_ok(stream: Any) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


class EchoFilter:
    """What ``fedbayes run --engine flower`` shows of the ``flwr run --stream`` output (the log file keeps all).

    ``colour=False`` strips ANSI escape codes.  ``verbose=False`` keeps only the lines that say something about
    this run: fedbayes' headline lines (``fedbayes: …``, shown without Flower's level prefix), warnings (but
    :data:`FLOWER_NOISE`), errors and tracebacks; the CLI's and the simulation's own INFO lines, and Ray's tips,
    are dropped.  The ServerApp already holds Flower's INFO chatter back (:mod:`server.logs`).
    """

    def __init__(self, *, verbose: bool, colour: bool, out: IO[str] | None = None) -> None:
        self.verbose = verbose
        self.colour = colour
        self.out = out
        self.pos = 0
        self._partial = b""
        self._traceback = False

    def lines(self, text: str) -> list[str]:
        """The lines of ``text`` (whole lines, no newline) to show."""
        out = []
        for raw in text.splitlines():
            plain = ANSI.sub("", raw)
            if self.verbose:
                out.append(raw if self.colour else plain)
                continue
            m = LEVEL.match(plain)
            level, msg = (m.group(1), plain[m.end():]) if m else (None, plain)
            if plain.startswith("Traceback (most recent call last)"):
                self._traceback = True
            elif self._traceback and not (plain.startswith((" ", "\t")) or not plain.strip()):
                self._traceback = False
                out.append(plain)  # the exception line that ends the traceback
                continue
            if self._traceback:
                out.append(plain)
            elif msg.startswith("fedbayes: "):
                out.append(msg)
            elif level in ("WARNING", "ERROR", "CRITICAL") and not msg.startswith(FLOWER_NOISE):
                out.append(raw if self.colour else plain)
        return out

    def follow(self, path: Path, *, final: bool = False) -> None:
        """Show what was appended to ``path`` since the last call (a last partial line only when ``final``)."""
        try:
            with open(path, "rb") as fh:
                fh.seek(self.pos)
                chunk = fh.read()
        except OSError:
            return
        self.pos += len(chunk)
        data = self._partial + chunk
        cut = len(data) if final else data.rfind(b"\n") + 1
        self._partial = data[cut:]
        shown = self.lines(data[:cut].decode(errors="replace"))
        if shown:
            out = self.out or sys.stdout
            out.write("".join(line + "\n" for line in shown))
            out.flush()


# ------------------------------------------------------------------------------------------ simulation
