"""A local Flower deployment of real processes for tests and benchmarks: a SuperLink and SuperNodes on 127.0.0.1
(free ports, optional TLS, optional SuperNode authentication with keys from
:func:`simulations.processes.make_supernode_key`), stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.processes import (
    FlowerRunError,
    Proc,
    flower_bin,
    flower_env,
    free_port,
    start_process,
    stop_process,
    wait_healthy,
    write_flwr_home,
)

__all__ = ["LocalDeployment"]


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
        link_args = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
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
        args = [flower_bin("flower-supernode"), *self._node_tls, "--superlink", f"127.0.0.1:{self.port}",
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
        return subprocess.run([flower_bin("flwr"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

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
