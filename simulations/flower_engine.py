"""Run a fedbayes experiment through Flower: the simulation runtime, or a local deployment of real processes.

:func:`run_flower_simulation` is ``fedbayes run --engine flower``: it starts a private SuperLink in simulation
mode on a free port (a private ``FLWR_HOME`` in a temporary folder, runtime dependency installation off),
submits this project as a Flower App with ``flwr run . <connection> --run-config FILE.toml
--federation-config "num-supernodes=K client-resources-num-cpus=… client-resources-num-gpus=…" --stream``,
stops the SuperLink and every process it started **by PID**, and returns the metrics rows the ServerApp wrote
to ``out_dir`` (the in-process engine's layout).  Flower's own managed ``local`` SuperLink is not used: it has
fixed ports, is shared by every ``flwr run . local`` on the machine and outlives the command.

:class:`LocalDeployment` starts ``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1 (free
ports, optional TLS, optional SuperNode authentication with keys from :func:`make_supernode_key`) for tests and
benchmarks; :func:`stop_process` and :func:`descendants` are the PID-based cleanup both use.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FlowerRunError",
    "LocalDeployment",
    "Proc",
    "alive",
    "descendants",
    "flower_env",
    "flwr_run",
    "free_port",
    "make_supernode_key",
    "project_root",
    "run_flower_simulation",
    "start_process",
    "stop_process",
    "wait_healthy",
    "write_flwr_home",
]


class FlowerRunError(RuntimeError):
    """A Flower run that did not finish; the message carries the tail of its logs."""


def project_root() -> Path:
    """The folder with this project's ``pyproject.toml`` (the Flower App that ``flwr run`` submits)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        raise FileNotFoundError(f"no pyproject.toml in {root}: the Flower engine needs a source checkout")
    return root


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


def _bin(name: str) -> str:
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
    args = [_bin("flwr"), "run", str(app_dir), connection, "--stream"]
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
def run_flower_simulation(
    flat_config: Mapping[str, Any],
    out_dir: Path,
    num_supernodes: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    *,
    app_dir: Path | None = None,
    timeout_s: float | None = None,
    echo: bool = True,
    keep_logs: Path | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run an experiment through Flower's simulation runtime; return the metrics rows from ``out_dir``.

    Parameters
    ----------
    flat_config
        A fedbayes flat config (as for :func:`fedbayes.engine.run_experiment`); validated first.
    out_dir
        The results folder the ServerApp writes (config.json, metrics.jsonl, posterior.safetensors, checkpoint/).
    num_supernodes
        Simulated SuperNodes; must equal the config's ``num-clients`` (partition-id = client).
    num_cpus, num_gpus
        Resources per ClientApp (``client-resources-num-cpus`` / ``-num-gpus``; a GPU fraction such as 0.25
        lets four ClientApps share one GPU).  Parallelism is min(CPUs / num_cpus, GPUs / num_gpus).
    app_dir
        The Flower App to submit (default: this project).
    timeout_s
        Stop everything and raise after this long (default: no limit).
    echo
        Stream Flower's output to stdout.
    keep_logs
        Copy the SuperLink and ``flwr run`` logs to this folder.
    resume
        Continue the run whose checkpoint is in ``out_dir`` (run-config ``resume-from``): ``flat_config`` must be
        that run's config, except ``rounds`` (which may extend it) and ``round-timeout``; the rows of all rounds
        are returned.

    Raises
    ------
    ConfigError
        A bad key in ``flat_config`` (before anything starts).
    ValueError
        ``num_supernodes`` differs from ``num-clients``, or bad resources.
    FlowerRunError
        The run did not write all its rounds; the message has the tail of the logs.
    """
    from fedbayes.config import resolve
    from fedbayes.results import read_metrics
    from server.runconfig import overrides_toml, run_config_overrides

    exp = resolve(flat_config)
    if num_supernodes != exp.run.num_clients:
        raise ValueError(f"num_supernodes={num_supernodes} must equal num-clients={exp.run.num_clients} "
                         "(each SuperNode is one client partition)")
    if not num_cpus > 0 or num_gpus < 0:
        raise ValueError(f"client resources must be num_cpus > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
    out = Path(out_dir).resolve()
    app = (app_dir or project_root()).resolve()
    flower_opts: dict[str, Any] = {"out-dir": str(out), "node-wait-s": 30.0}
    if resume:
        flower_opts["resume-from"] = str(out)
    overrides = run_config_overrides(exp.to_flat(), flower_opts)
    fed_cfg = (f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus:g} "
               f"client-resources-num-gpus={num_gpus:g}")
    with tempfile.TemporaryDirectory(prefix="fbflwr-") as tmp_s:
        tmp = Path(tmp_s)
        home = tmp / "home"
        port = free_port()
        write_flwr_home(home, {"fedbayes-sim": {"address": f"127.0.0.1:{port}", "insecure": True}}, "fedbayes-sim")
        env = flower_env(home, {"RAY_TMPDIR": str(tmp)})
        (tmp / "run-config.toml").write_text(overrides_toml(overrides))
        link = start_process("superlink", [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
        ], env, tmp, cwd=tmp)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", link)
            link.snapshot()
            rc = flwr_run(app, "fedbayes-sim", env, tmp / "flwr-run.log", run_config=tmp / "run-config.toml",
                          federation_config=fed_cfg, timeout_s=timeout_s, echo=echo)
            link.snapshot()
        finally:
            stop_process(link)
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for name in ("superlink.log", "flwr-run.log"):
                    if (tmp / name).exists():
                        (keep_logs / name).write_bytes((tmp / name).read_bytes())
        run_log = (tmp / "flwr-run.log").read_text(errors="replace") if (tmp / "flwr-run.log").exists() else ""
        rows = read_metrics(out) if (out / "metrics.jsonl").exists() else []
        if rc != 0 or len(rows) < exp.run.rounds or "fedbayes: results in" not in run_log:
            raise FlowerRunError(
                f"Flower simulation did not finish (flwr run exit {rc}, {len(rows)}/{exp.run.rounds} rounds "
                f"in {out}):\n{run_log[-6000:]}"
            )
    return rows


# ------------------------------------------------------------------------------------------ deployment
@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes as real processes on 127.0.0.1 (free ports; optional TLS).

    Parameters
    ----------
    workdir
        Logs, ``FLWR_HOME`` and the SuperLink database go here.
    node_configs
        One ``--node-config`` string per SuperNode, e.g. ``"partition-id=0 num-partitions=3"``.
    tls
        ``(ca.crt, server.pem, server.key)``: the SuperLink serves HTTPS, SuperNodes and the CLI verify with
        the CA.  None: ``--insecure`` everywhere.
    env_extra
        Extra environment for every process (e.g. ``{"OMP_NUM_THREADS": "1"}`` when several ClientApps share
        few cores).
    supernode_auth
        Start the SuperLink with ``--enable-supernode-auth`` (needs ``tls``): only SuperNodes whose public key
        was registered (``flwr supernode register``) may connect.
    node_keys
        Per SuperNode (by index), the private key it authenticates with (``--auth-supernode-private-key``), or
        None.  Shorter than ``node_configs``: the rest have none.
    register_keys
        Public keys registered with ``flwr supernode register`` once the SuperLink is up, before any SuperNode
        starts (:meth:`register`).
    """

    workdir: Path
    node_configs: Sequence[str]
    tls: tuple[Path, Path, Path] | None = None
    env_extra: Mapping[str, str] = field(default_factory=dict)
    supernode_auth: bool = False
    node_keys: Sequence[Path | None] = ()
    register_keys: Sequence[Path] = ()
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    registered: dict[str, int] = field(default_factory=dict)
    """Public key file -> the node id ``flwr supernode register`` gave it."""
    _node_tls: list[str] = field(default_factory=list, repr=False)

    @property
    def connection(self) -> str:
        return "fedbayes-deploy"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "home"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home, self.env_extra)

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait until healthy, then the SuperNodes; write the CLI connection."""
        if self.supernode_auth and self.tls is None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth without it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conn: dict[str, Any] = {"address": f"127.0.0.1:{self.port}"}
        link_args = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                     "--disable-runtime-dependency-installation", "--database", str(self.workdir / "state.db")]
        self._node_tls = ["--insecure"]
        scheme, verify = "http", True
        if self.tls is None:
            link_args.append("--insecure")
            conn["insecure"] = True
        else:
            ca, cert, key = self.tls
            link_args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
            self._node_tls = ["--root-certificates", str(ca)]
            conn["root-certificates"] = str(ca)
            scheme, verify = "https", ssl.create_default_context(cafile=str(ca))  # type: ignore[assignment]
        if self.supernode_auth:
            link_args.append("--enable-supernode-auth")
        write_flwr_home(self.flwr_home, {self.connection: conn}, self.connection)
        env = self.env()
        link = start_process("superlink", link_args, env, self.workdir, cwd=self.workdir)
        self.procs.append(link)
        wait_healthy(f"{scheme}://127.0.0.1:{self.port}/health", link, verify=verify)
        for pub in self.register_keys:
            self.register(pub)
        for i, node_cfg in enumerate(self.node_configs):
            self._start_node(i, node_cfg, self.node_keys[i] if i < len(self.node_keys) else None)
        return self

    def _start_node(self, i: int, node_config: str, private_key: Path | None) -> Proc:
        args = [_bin("flower-supernode"), *self._node_tls, "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", node_config]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        proc = start_process(f"supernode-{i}", args, self.env(), self.workdir, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def add_node(self, node_config: str, private_key: Path | None = None) -> Proc:
        """Start one more SuperNode (after :meth:`start`; e.g. once its key is registered); it is SuperNode
        ``len(node_configs)``, ``len(node_configs) + 1``, … for :meth:`node`."""
        if not self.procs:
            raise RuntimeError("start the deployment first")
        return self._start_node(len(self.procs) - 1, node_config, private_key)

    def _cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir)

    def register(self, public_key: Path) -> int:
        """``flwr supernode register PUBLIC_KEY`` on this SuperLink; returns the node id it assigns.

        Raises
        ------
        FlowerRunError
            The CLI failed (e.g. the key is not an ECDSA key on a NIST curve, or is already registered).
        """
        res = self._cli("supernode", "register", str(public_key), self.connection, "--format", "json")
        try:
            node_id = int(json.loads(res.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise FlowerRunError(f"flwr supernode register {public_key} failed (exit {res.returncode}):\n"
                                 f"{res.stdout}{res.stderr}") from None
        self.registered[str(public_key)] = node_id
        return node_id

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls --format json``: every SuperNode the SuperLink knows (registered, online, offline).

        Raises
        ------
        FlowerRunError
            The CLI failed.
        """
        res = self._cli("supernode", "ls", self.connection, "--format", "json")
        try:
            data = json.loads(res.stdout)
            nodes = data["nodes"]
        except (ValueError, KeyError, TypeError):
            raise FlowerRunError(f"flwr supernode ls failed (exit {res.returncode}):\n{res.stdout}{res.stderr}"
                                 ) from None
        return list(nodes)

    def node(self, i: int) -> Proc:
        """The process of SuperNode ``i`` (the order of ``node_configs``)."""
        return self.procs[1 + i]

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``i`` by PID (SIGKILL: it cannot unregister; the SuperLink finds out only when
        its heartbeats stop) and reap it; its SuperExec is stopped by :meth:`stop`, if still there."""
        proc = self.node(i)
        proc.snapshot()
        if proc.popen.poll() is None:
            os.kill(proc.pid, sig)
            proc.popen.wait(timeout=30)

    def snapshot(self) -> None:
        for p in self.procs:
            p.snapshot()

    def all_pids(self) -> set[int]:
        """Every PID started for this deployment, and their descendants seen so far."""
        self.snapshot()
        out: set[int] = set()
        for p in self.procs:
            out.add(p.pid)
            out.update(p.seen)
        return out

    def stop(self) -> None:
        """Stop SuperNodes first (they unregister), then the SuperLink; each with its descendants, by PID."""
        for p in reversed(self.procs):
            stop_process(p)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(n)}" for p in self.procs)
