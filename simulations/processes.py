"""Real processes for Flower runs and tests: start them with their own logs, find their descendants through
``/proc``, stop them **by PID** (SIGTERM, then SIGKILL), wait for a health endpoint; ``flwr`` CLI homes, free
ports and SuperNode key pairs; and ``flwr run`` itself (:func:`flwr_run`)."""

from __future__ import annotations

import os
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
             timeout_s: float | None = None, echo: bool = False, extra_args: Sequence[str] = ()) -> int:
    """``flwr run APP CONNECTION [--run-config FILE] [--federation-config …] --stream``; returns its exit code.

    The output goes to ``log_path`` (and to stdout with ``echo``).  On timeout the command is stopped by PID.
    """
    args = [flower_bin("flwr"), "run", str(app_dir), connection, "--stream"]
    if run_config is not None:
        args += ["--run-config", str(run_config)]
    if federation_config:
        args += ["--federation-config", federation_config]
    args += list(extra_args)
    proc = start_process(log_path.stem, args, env, log_path.parent, cwd=app_dir)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pos = 0
    try:
        while proc.popen.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise FlowerRunError(f"flwr run did not finish within {timeout_s:.0f} s:\n{proc.log_tail()}")
            time.sleep(0.5)
            if echo:
                pos = _echo(log_path, pos)
    finally:
        stop_process(proc, timeout=10.0)
        if echo:
            _echo(log_path, pos)
    return int(proc.popen.returncode)


def _echo(path: Path, pos: int) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            chunk = fh.read()
    except OSError:
        return pos
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return pos + len(chunk)


# ------------------------------------------------------------------------------------------ simulation
