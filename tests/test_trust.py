"""Runs you can trust: no silent reuse or overwrite of a results folder, a clean Ctrl-C, provenance (issue 23)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbayes import provenance as prov
from fedbayes.cli import main
from fedbayes.config import ConfigError, load_config_file, resolve
from fedbayes.engine import run_experiment
from fedbayes.results import RunExistsError
from simulations.compare import plan_cells

ROOT = Path(__file__).resolve().parent.parent
TINY = {"algorithm": "fedavg", "dataset": "digits", "num-clients": 2, "rounds": 2, "hidden": "8", "epochs": 1,
        "seed": 0, "bma-samples": 0}
CLI = ["--algorithm", "fedavg", "--dataset", "digits", "--clients", "2", "--rounds", "2", "--preset", "none",
       "--set", "hidden=8", "--set", "epochs=1", "--quiet"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "run"
    run_experiment(TINY, out, progress=False)
    return out


def test_a_folder_holding_a_run_is_refused_unless_overwritten(done: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = _hashes(done)
    with pytest.raises(RunExistsError, match=r"holds a run \(fedavg on digits, 2 rounds; checkpoint of round 2"):
        run_experiment({**TINY, "lr": 0.5}, done, progress=False)
    assert main(["run", *CLI, "--out", str(done)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {done}" in err and "--overwrite" in err and "another output folder" in err
    assert _hashes(done) == before  # nothing touched
    # --overwrite replaces the run: the old checkpoint's stale files do not survive
    out = tmp_path / "copy"
    run_experiment(TINY, out, progress=False)
    (out / "checkpoint" / "stale.txt").write_text("old")
    assert main(["run", *CLI, "--set", "lr=0.5", "--out", str(out), "--overwrite"]) == 0
    assert load_config_file(out / "config.json")["lr"] == 0.5
    assert not (out / "checkpoint" / "stale.txt").exists()


def test_resume_refuses_options_that_differ_from_the_checkpoint(done: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = _hashes(done)
    assert main(["run", "--resume", str(done), "--algorithm", "bayes-admm", "--set", "lr=0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "algorithm='bayes-admm' (checkpoint: 'fedavg')" in err and "lr=0.5 (checkpoint: None)" in err
    assert f"--config {done}/config.json --set algorithm=bayes-admm --set lr=0.5 --out NEW" in err
    assert main(["run", "--resume", str(done), "--set", "epochs=3", "--quiet"]) == 2
    assert "epochs=3 (checkpoint: 1)" in capsys.readouterr().err
    assert main(["run", "--resume", str(done), "--preset", "digits-10-het", "--quiet"]) == 2
    assert "--config and --preset start a new run" in capsys.readouterr().err
    assert _hashes(done) == before
    # the same values, and the keys that may change, are accepted (nothing left to do: 2 of 2 rounds)
    assert main(["run", "--resume", str(done), "--set", "epochs=1", "--set", "round-timeout=5", "--quiet"]) == 0


def test_resume_prints_the_summary_line_and_records_the_resume(done: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "part"
    run_experiment(TINY, out, progress=False, stop_round=1)
    made = json.loads((out / "config.json").read_text())["provenance"]
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["round"] == 2 and lines[0] == f"test_accuracy={last['test_accuracy']:.4f} " \
        f"test_nll={last['test_nll']:.4f} test_ece={last['test_ece']:.4f} test_brier={last['test_brier']:.4f}"
    after = json.loads((out / "config.json").read_text())["provenance"]
    resumes = after.pop("resumes")
    assert after == made  # the original provenance is kept
    assert len(resumes) == 1 and resumes[0]["from-round"] == 1 and "date" in resumes[0]


def test_provenance_is_recorded_and_not_a_config_key(done: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.loads((done / "config.json").read_text())
    made = raw["provenance"]
    assert made["fedbayes"] and made["python"] and made["torch"] and made["numpy"] and made["command"]
    assert made["date"].endswith("+00:00")
    assert set(made.get("git", {})) in (set(), {"commit", "dirty"})
    flat = load_config_file(done / "config.json")
    assert "provenance" not in flat and resolve(flat).to_flat() == flat  # --config reproduces the run
    meta = json.loads((done / "checkpoint" / "meta.json").read_text())
    assert "provenance" not in meta["config"]  # resume compares configs only
    # no git on PATH: no "git" entry, no failure
    monkeypatch.setenv("PATH", "/nonexistent")
    prov._git.cache_clear()
    try:
        assert "git" not in prov.provenance()
    finally:
        prov._git.cache_clear()


def test_compare_reuses_only_runs_with_the_same_settings(done: Path, tmp_path: Path) -> None:
    cfg = dict(TINY)
    assert plan_cells([(cfg, done), (cfg, tmp_path / "new")]) == [(done, "done"), (tmp_path / "new", "new")]
    assert plan_cells([({**cfg, "reported-prediction": "mean"}, done)]) == [(done, "done")]  # changes no training
    assert plan_cells([({**cfg, "rounds": 3}, done)]) == [(done, "resume")]  # extended from the checkpoint
    with pytest.raises(RunExistsError) as e:
        plan_cells([({**cfg, "epochs": 2, "lr": 0.5}, done)])
    assert f"{done}: epochs=2 (folder: 1), lr=0.5 (folder: None)" in str(e.value) and "--force" in str(e.value)
    with pytest.raises(RunExistsError, match=r"rounds=1 \(folder: 2\)"):
        plan_cells([({**cfg, "rounds": 1}, done)])
    assert plan_cells([({**cfg, "lr": 0.5}, done)], force=True) == [(done, "overwrite")]
    part = tmp_path / "part"
    run_experiment(TINY, part, progress=False, stop_round=1)
    assert plan_cells([(cfg, part)]) == [(part, "resume")]  # an interrupted comparison continues
    with pytest.raises(ConfigError):
        plan_cells([({**cfg, "epochs": -1}, tmp_path / "bad")])


def test_ctrl_c_says_how_to_continue_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FEDBAYES_DRAW_AHEAD": "1"}
    argv = ["run", "--algorithm", "bayes-admm", "--dataset", "digits", "--clients", "2", "--rounds", "6",
            "--preset", "none", "--set", "hidden=8", "--set", "epochs=1", "--set", "bma-samples=0", "--quiet"]
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler (the run would finish, rc 0)
    p = subprocess.Popen([sys.executable, "-m", "fedbayes", *argv, "--out", str(out)], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    while not (out / "checkpoint" / "meta.json").exists() and p.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    done = json.loads((out / "checkpoint" / "meta.json").read_text())["round"]
    assert f"holds round {done} of 6; continue with: fedbayes run --resume {out}" in err
    r = subprocess.run([sys.executable, "-m", "fedbayes", "run", "--resume", str(out), "--quiet"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [x["round"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == list(range(1, 7))
