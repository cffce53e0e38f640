"""A real Flower deployment on 127.0.0.1: flower-superlink + three flower-supernode processes + ``flwr run``.

Insecure and TLS (certificates made here with openssl, SAN IP:127.0.0.1).  bayes-admm runs 2 rounds and writes
its results folder; a run config with an unknown key makes the ServerApp fail naming the key without touching
that folder.  Every process is stopped by PID and checked gone.  A deployment round costs ~10-20 s here (a
fresh ClientApp process per message), so rounds and clients are minimal.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fedbayes.results import read_metrics
from fedbayes.runconfig import overrides_toml, run_config_overrides
from simulations.deployment import LocalDeployment
from simulations.flower_engine import project_root
from simulations.processes import alive, flwr_run

ROOT = project_root()
NODES = [f"partition-id={i} num-partitions=3" for i in range(3)]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # three ClientApps at once on a small machine: no thread oversubscription
FLAT = {"algorithm": "bayes-admm", "dataset": "digits", "num-clients": 3, "rounds": 2, "hidden": "16",
        "epochs": 1, "bma-samples": 4}


def _run_config(tmp: Path, out: Path, flat: dict[str, object] | None = None) -> Path:
    path = tmp / "run-config.toml"
    path.write_text(overrides_toml(run_config_overrides(flat or FLAT, {"out-dir": str(out), "node-wait-s": 120.0})))
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bad_app(tmp: Path) -> Path:
    """A copy of this Flower App whose pyproject run config has a key fedbayes does not know."""
    app = tmp / "bad-app"
    app.mkdir()
    for pkg in ("fedbayes", "server", "client"):  # the presets travel in the FAB inside fedbayes/
        shutil.copytree(ROOT / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace("[tool.flwr.app.config]\n",
                                                     "[tool.flwr.app.config]\nlearning-rate = 0.1\n", 1))
    return app


def _check_results(out: Path, rounds: int) -> None:
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert r["participants"] == [0, 1, 2] and r["failed"] == []
        assert r["test_accuracy"] > 0.2 and "bma_test_accuracy" in r  # learning (chance: 0.1)
    assert (out / "config.json").exists() and (out / "posterior.safetensors").exists()
    assert (out / "checkpoint" / "state.safetensors").exists()


def _assert_all_stopped(pids: set[int]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    assert not left, f"processes still running: {left}"


@pytest.mark.slow
def test_deployment_insecure_and_unknown_key(tmp_path: Path) -> None:
    out = tmp_path / "results"
    dep = LocalDeployment(tmp_path / "deploy", NODES, env_extra=ONE_THREAD)
    pids: set[int] = set()
    try:
        dep.start()
        t0 = time.perf_counter()
        rc = flwr_run(ROOT, dep.connection, dep.env(), tmp_path / "run.log", run_config=_run_config(tmp_path, out),
                      timeout_s=400)
        wall = time.perf_counter() - t0
        log = (tmp_path / "run.log").read_text(errors="replace")
        assert rc == 0 and (out / "metrics.jsonl").exists(), f"{log[-4000:]}\n{dep.logs()}"
        _check_results(out, 2)
        print(f"deployment: 2 rounds + node query in {wall:.1f} s")

        before = _digest(out)
        # flwr run -c with a key absent from pyproject: the SuperLink itself refuses the run
        rc_c = flwr_run(ROOT, dep.connection, dep.env(), tmp_path / "run-c.log", run_config=None,
                        timeout_s=120, extra_args=["--run-config", "no-such-key=1"])
        text_c = (tmp_path / "run-c.log").read_text(errors="replace")
        assert rc_c != 0, text_c
        # a pyproject with an unknown key: the ServerApp fails naming it, before touching the results folder
        bad = _bad_app(tmp_path)
        rc_bad = flwr_run(bad, dep.connection, dep.env(), tmp_path / "run-bad.log",
                          run_config=_run_config(tmp_path, out), timeout_s=240)
        text = (tmp_path / "run-bad.log").read_text(errors="replace")
        assert "learning-rate" in text and "unknown run config key" in text, text[-4000:]
        assert rc_bad != 0 or "ConfigError" in text
        assert _digest(out) == before
        pids = dep.all_pids()
    finally:
        dep.stop()
    _assert_all_stopped(pids)


def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "OWNER_UID": "0"}
    res = subprocess.run(["sh", str(ROOT / "docker" / "gen-certs.sh"), str(folder)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    san = subprocess.run(["openssl", "x509", "-in", str(folder / "server.pem"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, timeout=30).stdout
    assert "IP Address:127.0.0.1" in san
    return folder / "ca.crt", folder / "server.pem", folder / "server.key"


@pytest.mark.slow
def test_deployment_tls(tmp_path: Path) -> None:
    import httpx

    certs = _make_certs(tmp_path / "certs")
    out = tmp_path / "results"
    dep = LocalDeployment(tmp_path / "deploy", NODES, tls=certs, env_extra=ONE_THREAD)
    pids: set[int] = set()
    try:
        dep.start()
        with pytest.raises(httpx.HTTPError):  # TLS only: plain HTTP is refused
            httpx.get(f"http://127.0.0.1:{dep.port}/health", timeout=3)
        rc = flwr_run(ROOT, dep.connection, dep.env(), tmp_path / "run.log", run_config=_run_config(tmp_path, out),
                      timeout_s=400)
        log = (tmp_path / "run.log").read_text(errors="replace")
        assert rc == 0 and (out / "metrics.jsonl").exists(), f"{log[-4000:]}\n{dep.logs()}"
        _check_results(out, 2)
        pids = dep.all_pids()
    finally:
        dep.stop()
    _assert_all_stopped(pids)
