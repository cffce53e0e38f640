"""Authenticated federations: a TLS SuperLink with ``--enable-supernode-auth`` admits only registered SuperNodes.

* The compose overlay ``docker-compose.auth.yml`` (on top of ``docker-compose.tls.yml``) is schema-valid, uses only
  flags of the installed Flower 1.42, gives every SuperNode its own key and registers exactly those keys after the
  SuperLink is healthy and before any SuperNode starts.
* ``docker/gen-node-keys.sh`` (ssh-keygen) and :func:`simulations.flower_engine.make_supernode_key` (cryptography)
  write ECDSA P-384 keys that Flower's own loaders accept.
* Real processes (``slow``): a TLS SuperLink with SuperNode authentication; one key is registered with
  ``docker/register-supernodes.sh`` (what the compose one-shot service runs), one is not.  The registered SuperNode
  connects and trains a round; the unregistered one is refused (it exits logging Flower's exit code 305, "Failed
  to activate SuperNode"), never appears in ``flwr supernode ls``, and the run lists its partition as failed.
  Every process is stopped by PID and checked gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedbayes.results import read_metrics
from fedbayes.runconfig import overrides_toml, run_config_overrides
from simulations.deployment import LocalDeployment
from simulations.flower_engine import project_root
from simulations.processes import alive, flower_env, flwr_run, make_supernode_key
from tests.test_flower_compose import _merge

yaml = pytest.importorskip("yaml")

ROOT = project_root()
VENV_BIN = Path(sys.executable).parent
OVERLAYS = ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml"]
FLAT: dict[str, Any] = {"algorithm": "bayes-admm", "dataset": "digits", "num-clients": 2, "rounds": 1,
                        "hidden": "16", "epochs": 1, "bma-samples": 4}


# ------------------------------------------------------------------------------------------ compose overlay


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for name in OVERLAYS:
        spec = _merge(spec, yaml.safe_load((ROOT / name).read_text()))
    return spec


def _help(binary: str) -> str:
    res = subprocess.run([str(VENV_BIN / binary), "--help"], capture_output=True, text=True, timeout=120,
                         env=flower_env(Path("/nonexistent-flwr-home")))
    return res.stdout + res.stderr


def test_auth_overlay_schema() -> None:
    exe = shutil.which("check-jsonschema", path=str(VENV_BIN)) or shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed")
    res = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.auth.yml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_auth_overlay_wires_keys_and_registration() -> None:
    spec = _spec()
    svc = spec["services"]
    link = [str(a) for a in svc["superlink"]["command"]]
    assert "--enable-supernode-auth" in link and "--insecure" not in link and "--ssl-certfile" in link
    link_help = _help("flower-superlink")
    for flag in (a for a in link if a.startswith("--")):
        assert flag in link_help, f"flower-superlink has no {flag}"
    node_help = _help("flower-supernode")
    keys = []
    for i in range(3):
        node = svc[f"supernode-{i}"]
        cmd = [str(a) for a in node["command"]]
        for flag in (a for a in cmd if a.startswith("--")):
            assert flag in node_help, f"flower-supernode has no {flag}"
        assert "--insecure" not in cmd and cmd[cmd.index("--root-certificates") + 1] == "/app/certs/ca.crt"
        key = cmd[cmd.index("--auth-supernode-private-key") + 1]
        assert key == f"/app/certs/supernode-{i}" and cmd[cmd.index("--node-config") + 1].startswith(
            f"partition-id={i} ")
        assert node["depends_on"]["register-supernodes"]["condition"] == "service_completed_successfully"
        assert node["depends_on"]["superlink"]["condition"] == "service_healthy"
        assert any(str(v).startswith("fedbayes-certs:/app/certs") for v in node["volumes"])
        keys.append(key)
    reg = svc["register-supernodes"]
    assert reg["image"] == "flwr/superlink:1.42.0" and reg["restart"] == "no"
    assert reg["entrypoint"] == ["sh", "/docker/register-supernodes.sh"]
    assert reg["command"] == ["superlink:8000", "/app/certs/ca.crt", *[f"{k}.pub" for k in keys]]
    assert reg["depends_on"]["superlink"]["condition"] == "service_healthy"
    certs = " ".join(str(c) for c in svc["certs"]["command"])
    assert "gen-certs.sh /certs" in certs and "gen-node-keys.sh /certs 3" in certs and "openssh-keygen" in certs


def _flower_accepts(private: Path, public: Path) -> None:
    """Load the pair with the loaders Flower 1.42 uses (``flwr supernode register``, ``flower-supernode``)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())


def test_node_keys_are_what_flower_expects(tmp_path: Path) -> None:
    priv, pub = make_supernode_key(tmp_path / "py", "node")
    _flower_accepts(priv, pub)
    assert priv.stat().st_mode & 0o077 == 0
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (docker/gen-node-keys.sh needs it)")
    out = tmp_path / "sh"
    res = subprocess.run(["sh", str(ROOT / "docker" / "gen-node-keys.sh"), str(out), "2"], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "OWNER_UID": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    for i in range(2):
        _flower_accepts(out / f"supernode-{i}", out / f"supernode-{i}.pub")
    before = (out / "supernode-0.pub").read_bytes()
    subprocess.run(["sh", str(ROOT / "docker" / "gen-node-keys.sh"), str(out), "2"], check=True, capture_output=True,
                   timeout=60, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "OWNER_UID": "0"})
    assert (out / "supernode-0.pub").read_bytes() == before  # kept, not rotated


# ------------------------------------------------------------------------------------------ real processes
def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    res = subprocess.run(["sh", str(ROOT / "docker" / "gen-certs.sh"), str(folder)], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "OWNER_UID": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    return folder / "ca.crt", folder / "server.pem", folder / "server.key"


def _register_with_script(dep: LocalDeployment, ca: Path, home: Path, *keys: Path) -> str:
    """What the compose one-shot ``register-supernodes`` service runs, against the loopback SuperLink."""
    env = flower_env(home, {"FLWR_HOME": str(home)})
    res = subprocess.run(["sh", str(ROOT / "docker" / "register-supernodes.sh"), f"127.0.0.1:{dep.port}", str(ca),
                          *map(str, keys)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_only_registered_supernodes_join(tmp_path: Path) -> None:
    ca, cert, key = _make_certs(tmp_path / "certs")
    keys = tmp_path / "keys"
    if shutil.which("ssh-keygen") is not None:  # the compose path: docker/gen-node-keys.sh
        subprocess.run(["sh", str(ROOT / "docker" / "gen-node-keys.sh"), str(keys), "1"], check=True,
                       capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "OWNER_UID": "0"})
        good, good_pub = keys / "supernode-0", keys / "supernode-0.pub"
    else:
        good, good_pub = make_supernode_key(keys, "supernode-0")
    stranger, _ = make_supernode_key(keys, "stranger")  # a valid key nobody registered
    out = tmp_path / "results"
    rc_file = tmp_path / "rc.toml"
    rc_file.write_text(overrides_toml(run_config_overrides(FLAT, {"out-dir": str(out), "node-wait-s": 10.0})))
    dep = LocalDeployment(tmp_path / "deploy", [], tls=(ca, cert, key), env_extra={"OMP_NUM_THREADS": "1"},
                          supernode_auth=True)
    pids: set[int] = set()
    try:
        dep.start()
        said = _register_with_script(dep, ca, tmp_path / "register-home", good_pub)
        assert "registered: node id" in said, said
        assert "registered before" in _register_with_script(dep, ca, tmp_path / "register-home", good_pub)
        registered = [n for n in dep.supernodes()]
        assert len(registered) == 1
        node_id = str(registered[0]["node-id"])

        member = dep.add_node("partition-id=0 num-partitions=2", good)
        intruder = dep.add_node("partition-id=1 num-partitions=2", stranger)
        _wait(lambda: intruder.popen.poll() is not None, 60, "the unregistered SuperNode to be refused")
        refusal = intruder.log_tail()
        assert intruder.popen.returncode != 0 and "Exit Code: 305" in refusal, refusal
        assert "Failed to activate SuperNode" in refusal
        link_log = dep.procs[0].log_tail(20000)
        assert "No SuperNode found with the given public key" in link_log

        _wait(lambda: any(n["status"] == "online" for n in dep.supernodes()), 60, "the registered SuperNode")
        t0 = time.perf_counter()
        rc = flwr_run(ROOT, dep.connection, dep.env(), tmp_path / "run.log", run_config=rc_file, timeout_s=300)
        wall = time.perf_counter() - t0
        log = (tmp_path / "run.log").read_text(errors="replace")
        assert rc == 0 and "fedbayes: results in" in log, f"{log[-4000:]}\n{dep.logs()}"
        nodes = dep.supernodes()
        assert [str(n["node-id"]) for n in nodes] == [node_id], nodes  # the intruder never appears
        assert member.popen.poll() is None
        pids = dep.all_pids()
    finally:
        dep.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "processes left running"
    rows = read_metrics(out)
    print(f"authenticated federation: 1 round (+ node wait) in {wall:.1f} s; rows "
          f"{[(r['round'], r['participants'], r['failed']) for r in rows]}")
    assert [(r["participants"], r["failed"]) for r in rows] == [([0], [1])]  # only the registered node trained
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["round"] == 1


@pytest.mark.slow
def test_register_refuses_keys_flower_cannot_use(tmp_path: Path) -> None:
    """``flwr supernode register`` takes only ECDSA keys on NIST curves: an Ed25519 key is refused before any
    connection (no SuperLink needed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = tmp_path / "ed.pub"
    pub.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    home = tmp_path / "home"
    home.mkdir()
    res = subprocess.run([str(VENV_BIN / "flwr"), "supernode", "register", str(pub), "nowhere"],
                         capture_output=True, text=True, timeout=120, env=flower_env(home))
    assert res.returncode != 0
    assert "Not an EC public key" in res.stdout + res.stderr
