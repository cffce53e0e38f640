"""docker-compose.yml and its overlays: schema-valid, every flag known to Flower 1.42, and the topology trains.

No Docker engine is needed: the topology test reads docker-compose.yml and runs each service's command line as
a local process (container hostnames mapped to 127.0.0.1, every listening port replaced by a free one, volumes
by temporary folders), runs its health checks, submits a 1-round run with ``flwr run`` and stops every process
by PID.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from fedbayes.runconfig import overrides_toml  # noqa: E402
from simulations.flower_engine import project_root  # noqa: E402
from simulations.processes import (  # noqa: E402
    Proc,
    alive,
    flower_env,
    flwr_run,
    free_port,
    start_process,
    stop_process,
    write_flwr_home,
)

ROOT = project_root()
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml", "docker-compose.gpu.yml",
                 "docker-compose.host.yml", "docker-compose.tls-host.yml", "docker-compose.auth-host.yml"]
HOST_SETUPS = {
    "insecure": ["docker-compose.host.yml"],
    "tls": ["docker-compose.tls.yml", "docker-compose.host.yml", "docker-compose.tls-host.yml"],
    "auth": ["docker-compose.tls.yml", "docker-compose.auth.yml", "docker-compose.host.yml",
             "docker-compose.tls-host.yml", "docker-compose.auth-host.yml"],
}
IMAGE_BINARIES = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
                  "flwr/superexec": "flower-superexec"}
VENV_BIN = Path(sys.executable).parent


def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(data, dict)
    return data


def _merge(base: Any, over: Any) -> Any:
    """Compose-style merge for what these files use: mappings recursively; command/entrypoint/lists replaced,
    except volumes, merged by their container path."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if k == "volumes" and isinstance(v, list) and isinstance(base.get(k), list):
                by_target = {str(x).split(":")[1]: x for x in base[k]}
                by_target.update({str(x).split(":")[1]: x for x in v})
                out[k] = list(by_target.values())
            else:
                out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _binary(svc: dict[str, Any]) -> str | None:
    ep = svc.get("entrypoint")
    if ep:
        first = ep[0] if isinstance(ep, list) else str(ep).split()[0]
        return first if first.startswith("flower-") else None
    image = str(svc.get("image", "")).split(":")[0]
    return IMAGE_BINARIES.get(image)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_schema(name: str) -> None:
    exe = shutil.which("check-jsonschema", path=str(VENV_BIN)) or shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed")
    res = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / name)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _help(binary: str, cache: dict[str, str] = {}) -> str:  # noqa: B006 - deliberate per-process cache
    if binary not in cache:
        res = subprocess.run([str(VENV_BIN / binary), "--help"], capture_output=True, text=True, timeout=120,
                             env=flower_env(Path("/nonexistent-flwr-home")))
        cache[binary] = res.stdout + res.stderr
    return cache[binary]


@pytest.mark.parametrize("overlays", [[], ["docker-compose.tls.yml"], ["docker-compose.gpu.yml"],
                                      ["docker-compose.tls.yml", "docker-compose.gpu.yml"],
                                      *HOST_SETUPS.values()])
def test_compose_flags_exist_in_flower_1_42(overlays: list[str]) -> None:
    """Every --flag of every Flower service (base file merged with the overlays) is in that binary's --help,
    images are pinned to 1.42.0, and three SuperNodes carry partition-id 0..2."""
    spec = _load("docker-compose.yml")
    for o in overlays:
        spec = _merge(spec, _load(o))
    partitions = []
    for name, svc in spec["services"].items():
        binary = _binary(svc)
        image = str(svc.get("image", ""))
        if image.startswith("flwr/"):
            assert image.endswith(":1.42.0"), f"{name}: {image} is not pinned to 1.42.0"
        if binary is None:
            continue
        helptext = _help(binary)
        for arg in svc.get("command", []):
            flag = str(arg).split("=")[0]
            if flag.startswith("--"):
                assert re.search(rf"{re.escape(flag)}\b", helptext), f"{name}: {binary} has no {flag}"
        cmd = [str(a) for a in svc.get("command", [])]
        if "--node-config" in cmd:
            partitions.append(cmd[cmd.index("--node-config") + 1])
    assert sorted(partitions) == [f"partition-id={i} num-partitions=3" for i in range(3)]
    if "docker-compose.gpu.yml" in overlays:
        dev = spec["services"]["superexec-clientapp-0"]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def _spec(overlays: list[str]) -> dict[str, Any]:
    spec = _load("docker-compose.yml")
    for o in overlays:
        spec = _merge(spec, _load(o))
    return spec


def _listens(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host, port) pairs a Flower service binds: --host/--port and --health-server-address."""
    cmd = [str(a) for a in svc.get("command", [])]
    out = []
    if "--port" in cmd:
        out.append((cmd[cmd.index("--host") + 1] if "--host" in cmd else "127.0.0.1", cmd[cmd.index("--port") + 1]))
    if "--health-server-address" in cmd:
        host, port = cmd[cmd.index("--health-server-address") + 1].rsplit(":", 1)
        out.append((host, port))
    return out


@pytest.mark.parametrize("setup", list(HOST_SETUPS))
def test_host_overlays_wiring(setup: str) -> None:
    """Host networking on one host: every service has network_mode host and no network of its own; each Flower
    service binds 127.0.0.1 on a port no other service binds; every address a service dials (name:port) is one
    that its target binds, the name resolving to 127.0.0.1 (extra_hosts); health checks probe the service's own
    port; the SuperLink and SuperNodes run from the app image (no Docker Hub), never pulled."""
    spec = _spec(HOST_SETUPS[setup])
    assert "networks" not in spec
    binds: dict[str, str] = {}  # port -> service
    for name, svc in spec["services"].items():
        assert svc.get("network_mode") == "host", f"{setup}: {name} is not on the host network"
        assert "networks" not in svc, f"{setup}: {name} joins a network"
        if not str(svc.get("image", "")).startswith("fedbayes-superexec:"):
            raise AssertionError(f"{setup}: {name} runs {svc.get('image')}, not the app image")
        assert "build" in svc or svc.get("pull_policy") == "never", f"{setup}: {name} may be pulled"
        for host, port in _listens(svc):
            assert host == "127.0.0.1", f"{setup}: {name} binds {host}"
            assert port not in binds, f"{setup}: {name} and {binds.get(port)} both bind port {port}"
            binds[port] = name
    for name, svc in spec["services"].items():
        hosts = dict(str(h).split(":", 1) for h in svc.get("extra_hosts", []))
        cmd = [str(a) for a in svc.get("command", [])]
        for flag in ("--superlink", "--runtime-api-address"):
            if flag in cmd:
                target, port = cmd[cmd.index(flag) + 1].split(":")
                assert hosts.get(target) == "127.0.0.1", f"{setup}: {name} cannot resolve {target}"
                assert binds.get(port) == target, f"{setup}: {name} dials {target}:{port}, bound by {binds.get(port)}"
        check = " ".join(str(a) for a in svc.get("healthcheck", {}).get("test", []))
        own = {p for h, p in _listens(svc)}
        probed = set(re.findall(r"(?:127\.0\.0\.1|superlink):(\d+)", check))
        assert probed <= own, f"{setup}: {name}'s health check probes {probed}, it binds {own}"
        if own:
            assert probed, f"{setup}: {name} has no health check on its own port"
    tls = setup != "insecure"
    link = [str(a) for a in spec["services"]["superlink"]["command"]]
    assert ("--insecure" not in link) == tls and ("--ssl-certfile" in link) == tls
    assert ("--enable-supernode-auth" in link) == (setup == "auth")
    for i in range(3):
        node = [str(a) for a in spec["services"][f"supernode-{i}"]["command"]]
        assert ("--root-certificates" in node) == tls
        assert ("--auth-supernode-private-key" in node) == (setup == "auth")


# ------------------------------------------------------------------------------------------ the topology
class ComposeAsProcesses:
    """Run the Flower services of a compose spec as local processes."""

    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.services = {n: s for n, s in spec["services"].items() if _binary(s) is not None}
        self.ports: dict[tuple[str, str], int] = {}
        self.procs: dict[str, Proc] = {}
        for name, svc in self.services.items():
            for port in self._listen_ports(svc):
                self.ports[(name, port)] = free_port()
        self.volumes: dict[str, dict[str, Path]] = {}
        for name, svc in spec["services"].items():
            mounts: dict[str, Path] = {}
            for v in svc.get("volumes", []):
                src, dst = str(v).split(":")[:2]
                local = (ROOT / src) if src.startswith(".") else (workdir / "volumes" / re.sub(r"\W", "_", src))
                local.mkdir(parents=True, exist_ok=True)
                mounts[dst] = local
            self.volumes[name] = mounts

    @staticmethod
    def _listen_ports(svc: dict[str, Any]) -> list[str]:
        cmd = [str(a) for a in svc.get("command", [])]
        out = []
        for i, a in enumerate(cmd):
            if a == "--port":
                out.append(cmd[i + 1])
            m = re.fullmatch(r"0\.0\.0\.0:(\d+)", a)
            if m:
                out.append(m.group(1))
        return out

    def _map_text(self, name: str, text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            host, port = m.group(1), m.group(2)
            owner = name if host in ("127.0.0.1", "0.0.0.0", "localhost") else host
            if (owner, port) in self.ports:
                return f"127.0.0.1:{self.ports[(owner, port)]}"
            return m.group(0)

        text = re.sub(r"([A-Za-z0-9_.-]+):(\d+)", repl, text)
        for dst, local in sorted(self.volumes[name].items(), key=lambda kv: -len(kv[0])):
            text = text.replace(dst, str(local))
        return text

    def command(self, name: str) -> list[str]:
        svc = self.services[name]
        cmd = [str(a) for a in svc.get("command", [])]
        out = [str(VENV_BIN / str(_binary(svc)))]
        for i, a in enumerate(cmd):
            if a == "0.0.0.0":
                out.append("127.0.0.1")
            elif i > 0 and cmd[i - 1] == "--port":
                out.append(str(self.ports[(name, a)]))
            else:
                out.append(self._map_text(name, a))
        return out

    def healthcheck(self, name: str) -> list[str] | None:
        test = self.services[name].get("healthcheck", {}).get("test")
        if not test:
            return None
        assert test[0] == "CMD" and test[1] == "python", f"{name}: healthcheck must be ['CMD', 'python', ...]"
        return [sys.executable, *[self._map_text(name, str(a)) for a in test[2:]]]

    def wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        check = self.healthcheck(name)
        assert check is not None, f"{name} is a dependency with condition service_healthy but has no healthcheck"
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.procs[name]
            assert proc.popen.poll() is None, f"{name} exited:\n{proc.log_tail()}"
            res = subprocess.run(check, capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                return
            last = res.stderr[-500:]
            time.sleep(0.5)
        raise AssertionError(f"{name} not healthy after {timeout:.0f} s: {last}\n{self.procs[name].log_tail()}")

    def order(self) -> list[str]:
        done: list[str] = []

        def visit(n: str) -> None:
            if n in done or n not in self.services:
                return
            for dep in self.services[n].get("depends_on", {}):
                visit(dep)
            done.append(n)

        for n in self.services:
            visit(n)
        return done

    def start(self, env: dict[str, str]) -> None:
        for name in self.order():
            svc = self.services[name]
            for dep, cond in svc.get("depends_on", {}).items():
                if dep not in self.services:  # a one-shot init service (volume ownership, certificates)
                    assert cond.get("condition") == "service_completed_successfully", (name, dep)
                elif cond.get("condition") == "service_healthy":
                    self.wait_healthy(dep)
            svc_env = dict(env)
            svc_env.update({k: self._map_text(name, str(v)) for k, v in (svc.get("environment") or {}).items()})
            cwd = self.workdir / "cwd" / name  # like the image's WORKDIR /app
            cwd.mkdir(parents=True, exist_ok=True)
            self.procs[name] = start_process(name, self.command(name), svc_env, self.workdir / "logs", cwd=cwd)
        for name in self.services:
            if self.healthcheck(name) is not None:
                self.wait_healthy(name)

    def all_pids(self) -> set[int]:
        out: set[int] = set()
        for p in self.procs.values():
            p.snapshot()
            out |= {p.pid, *p.seen}
        return out

    def stop(self) -> None:
        for name in reversed(self.order()):
            if name in self.procs:
                stop_process(self.procs[name])

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.log_tail(2500)}" for n, p in self.procs.items())


def _make_certs(folder: Path) -> None:
    """What the TLS overlay's one-shot ``certs`` service does: docker/gen-certs.sh (openssl) into its volume."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    res = subprocess.run(["sh", str(ROOT / "docker" / "gen-certs.sh"), str(folder)], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "OWNER_UID": "0"})
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overlays", [[], ["docker-compose.tls.yml"]], ids=["base", "tls"])
def test_compose_topology_trains(tmp_path: Path, overlays: list[str]) -> None:
    """docker-compose.yml (and the TLS overlay): SuperLink, 3 SuperNodes, 4 SuperExecs as processes; 1 round of
    bayes-admm; results in the ServerApp SuperExec's working directory (the image's /app -> /app/runs/flower)."""
    spec = _load("docker-compose.yml")
    for o in overlays:
        spec = _merge(spec, _load(o))
    topo = ComposeAsProcesses(spec, tmp_path)
    home = tmp_path / "home"
    link_port = topo.ports[("superlink", "8000")]
    conn: dict[str, Any] = {"address": f"127.0.0.1:{link_port}", "insecure": True}
    if "certs" in spec["services"]:
        certs = topo.volumes["certs"]["/certs"]
        _make_certs(certs)
        conn = {"address": f"127.0.0.1:{link_port}", "root-certificates": str(certs / "ca.crt")}
    write_flwr_home(home, {"compose": conn}, "compose")
    env = flower_env(home, {"OMP_NUM_THREADS": "1"})  # 3 ClientApps at once on a small machine
    rc_file = tmp_path / "run-config.toml"
    rc_file.write_text(overrides_toml({"rounds": 1, "hidden": "16", "bma-samples": 4, "node-wait-s": 120.0}))
    pids: set[int] = set()
    try:
        topo.start(env)
        if "certs" in spec["services"]:  # TLS only: plain HTTP to the SuperLink is refused
            import httpx

            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{link_port}/health", timeout=3)
        rc = flwr_run(ROOT, "compose", env, tmp_path / "flwr-run.log", run_config=rc_file, timeout_s=300)
        pids = topo.all_pids()
        out = tmp_path / "cwd" / "superexec-serverapp" / "runs" / "flower"
        run_log = (tmp_path / "flwr-run.log").read_text(errors="replace")
        assert rc == 0 and (out / "metrics.jsonl").exists(), f"{run_log[-4000:]}\n{topo.logs()}"
    finally:
        topo.stop()
    from fedbayes.results import read_metrics

    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1] and rows[0]["participants"] == [0, 1, 2]
    assert (out / "posterior.safetensors").exists() and (out / "checkpoint" / "meta.json").exists()
    assert (tmp_path / "volumes" / "superlink_state" / "state.db").exists()  # the state volume is used
    time.sleep(0.5)
    assert not [p for p in pids if alive(p)], "processes left running"
