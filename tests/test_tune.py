"""Fair tuning (issue 13 §3): the validation split, val_* metrics, search spaces and ``fedbayes tune``
(study files, resume after SIGKILL, refusal to mix studies, diverging trials, tune-apply)."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbayes.algorithms import REGISTRY
from fedbayes.cli import main
from fedbayes.config import ConfigError, load_config_file, resolve
from fedbayes.data import load_dataset
from fedbayes.engine import run_experiment
from fedbayes.federation import Federation
from fedbayes.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]
FAST = {"dataset": "digits", "num-clients": 2, "rounds": 2, "epochs": 1, "seed": 3}
TUNE = ["--preset", "digits-10-het", "--rounds", "2", "--set", "num-clients=2", "--set", "epochs=1", "--quiet"]


def _client_rows(fed: Federation) -> np.ndarray:
    return np.concatenate([fed.data.train_rows()[p] for p in fed.parts])


# ------------------------------------------------------------------------------------------ validation split
def test_keep_rest_leaves_training_subset_unchanged() -> None:
    plain = load_dataset("digits", train_fraction=0.5, seed=4)
    rest = load_dataset("digits", train_fraction=0.5, seed=4, keep_rest=True)
    assert np.array_equal(plain.x_train, rest.x_train) and np.array_equal(plain.y_train, rest.y_train)
    assert plain.x_rest is None and rest.x_rest is not None and rest.rest_index is not None
    full = load_dataset("digits")
    rows = np.concatenate([rest.train_rows(), rest.rest_index])
    assert np.array_equal(np.sort(rows), np.arange(full.num_train))
    assert np.array_equal(rest.x_rest, full.x_train[rest.rest_index])


def test_validation_from_unused_examples_keeps_client_data() -> None:
    """train-fraction < 1: the validation set comes from the unused remainder; the clients' data is exactly that
    of the run without a validation set; reproducible; stratified; the test set untouched."""
    flat = {**FAST, "train-fraction": 0.5}
    ref = Federation.build(resolve(flat))
    a = Federation.build(resolve({**flat, "validation-fraction": 0.2, "eval-split": "validation"}))
    b = Federation.build(resolve({**flat, "validation-fraction": 0.2}))
    assert a.validation is not None and b.validation is not None
    assert a.validation.source == "unused"
    for (xa, ya), (xr, yr) in zip(a.client_data, ref.client_data, strict=True):
        assert np.array_equal(xa.numpy(), xr.numpy()) and np.array_equal(ya.numpy(), yr.numpy())
    held = _client_rows(a)
    assert len(a.validation.rows) == round(0.2 * len(held))
    assert not set(a.validation.rows.tolist()) & set(held.tolist())
    assert np.array_equal(a.validation.rows, b.validation.rows)
    assert a.validation.fingerprint() == b.validation.fingerprint()
    full = load_dataset("digits")
    assert np.array_equal(a.validation.x, full.x_train[a.validation.rows])
    assert np.array_equal(a.validation.y, full.y_train[a.validation.rows])
    counts = np.bincount(a.validation.y, minlength=10)
    assert counts.max() - counts.min() <= 1  # stratified (digits is balanced)
    assert np.array_equal(a.x_test.numpy(), ref.x_test.numpy())  # type: ignore[union-attr]
    other = Federation.build(resolve({**flat, "validation-fraction": 0.2, "seed": 4}))
    assert other.validation is not None and other.validation.fingerprint() != a.validation.fingerprint()


def test_validation_held_out_when_partition_uses_everything() -> None:
    exp = resolve({**FAST, "validation-fraction": 0.1, "eval-split": "validation"})
    fed = Federation.build(exp)
    again = Federation.build(exp)
    v = fed.validation
    assert v is not None and again.validation is not None and v.source == "held-out"
    n = load_dataset("digits").num_train
    assert len(v.rows) == round(0.1 * n)
    held = _client_rows(fed)
    assert len(held) + len(v.rows) == n and not set(held.tolist()) & set(v.rows.tolist())
    assert np.array_equal(v.rows, again.validation.rows)
    x, _, prefix = fed.eval_data()
    assert prefix == "val_" and x.shape[0] == len(v.rows)


def test_eval_split_validation_writes_val_keys_and_split_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="validation-fraction"):
        resolve({**FAST, "eval-split": "validation"})
    flat = {**FAST, "algorithm": "bayes-admm", "validation-fraction": 0.1, "eval-split": "validation",
            "bma-samples": 2}
    rows = run_experiment(flat, tmp_path / "run", progress=False)
    keys = set(rows[-1])
    assert {"val_nll", "val_accuracy", "bma_val_nll", "bma_val_accuracy"} <= keys
    assert not any(k.startswith(("test_", "bma_test_")) for k in keys)
    cfg = load_config_file(tmp_path / "run" / "config.json")
    assert cfg["validation-fraction"] == 0.1 and cfg["eval-split"] == "validation"
    resolve(cfg)  # config.json still resolves
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    fed = Federation.build(resolve(flat))
    assert fed.validation is not None and split["sha256-16"] == fed.validation.fingerprint()
    assert split["num-validation"] == len(fed.validation.rows)


# ------------------------------------------------------------------------------------------ search spaces
def test_every_algorithm_declares_a_valid_search_space() -> None:
    for name, cls in REGISTRY.items():
        assert cls.search_space, name
        assert "lr" in cls.search_space, name
        for key, dim in cls.search_space.items():
            for v in dim.bounds():
                resolve({**FAST, "algorithm": name, key: v})  # a key the config knows, edges in range
    assert REGISTRY["fedprox"].search_space is not REGISTRY["fedavg"].search_space


# ------------------------------------------------------------------------------------------ fedbayes tune
def _states(db: Path) -> dict[int, str]:
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(con.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    finally:
        con.close()


def _trial(db: Path, number: int) -> tuple[dict[str, float], float]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tid = con.execute("SELECT trial_id FROM trials WHERE number = ?", (number,)).fetchone()[0]
        params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id = ?", (tid,)))
        value = con.execute("SELECT value FROM trial_values WHERE trial_id = ?", (tid,)).fetchone()[0]
        return params, value
    finally:
        con.close()


# The subprocess's first trial runs normally, every later one hangs: it is killed while trial 1 is RUNNING.
_SLOW = """
import sys, time
import fedbayes.engine as engine
orig, calls = engine.run_experiment, []
def slow(*a, **k):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(600)
    return orig(*a, **k)
engine.run_experiment = slow
from fedbayes.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_during_second_trial(argv: list[str], db: Path) -> None:
    """Run ``fedbayes ARGV`` in a subprocess whose first run completes and whose later runs hang; SIGKILL it once
    the study's trial 1 is RUNNING (trial 0 COMPLETE), as a crash mid-study would leave it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _states(db).get(1) != "RUNNING":  # trial 0 complete, trial 1 started (it hangs)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the first trial did not complete in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert _states(db) == {0: "COMPLETE", 1: "RUNNING"}


def test_tune_study_resumes_after_sigkill_and_refuses_other_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    db = out / "study.db"
    argv = ["tune", *TUNE, "--algorithm", "fedprox", "--trials", "3", "--out", str(out)]
    kill_during_second_trial(argv, db)
    first = _trial(db, 0)

    assert main([*argv, "--jobs", "2"]) == 0  # the same command continues the study (2 processes, 1 trial each)
    after = _states(db)
    assert after[0] == "COMPLETE" and _trial(db, 0) == first  # the earlier trial is kept
    assert after[1] == "FAIL"  # left RUNNING by the killed process
    assert len(after) == 4 and all(after[n] in ("COMPLETE", "PRUNED") for n in (2, 3))

    best = tomllib.loads((out / "best.toml").read_text())
    table = best["algorithms"]["fedprox"]
    assert table["mode"] == "adam" and 1e-4 <= table["lr"] <= 1e-2 and 1e-4 <= table["mu"] <= 1.0
    info = json.loads((out / "best.json").read_text())
    assert info["trials"]["finished"] == 3 and info["metric"] == "val_nll" and info["algorithm"] == "fedprox"
    assert (out / "best.toml").read_text().startswith("# fedbayes tune: best hyperparameters of fedprox")
    assert (out / "history.png").stat().st_size > 0 and (out / "importance.png").stat().st_size > 0

    # another algorithm or preset against this folder: an error naming the key, the db untouched
    raw = db.read_bytes()
    capsys.readouterr()
    assert main(["tune", *TUNE, "--algorithm", "fedavg", "--trials", "3", "--out", str(out)]) == 2
    assert "algorithm" in capsys.readouterr().err
    other = ["tune", "--preset", "adult-10-het", "--rounds", "2", "--algorithm", "fedprox", "--trials", "3",
             "--out", str(out), "--quiet"]
    assert main(other) == 2
    assert "preset" in capsys.readouterr().err
    assert main([*argv, "--objective", "accuracy"]) == 2
    assert "objective" in capsys.readouterr().err
    assert db.read_bytes() == raw

    # tune-apply: the tuned table lands in a copy of the preset, which validates
    new = tmp_path / "tuned.toml"
    assert main(["tune-apply", str(out), "--preset", "digits-10-het", "--out", str(new)]) == 0
    tuned = load_preset(str(new))
    assert tuned.algorithms["fedprox"]["lr"] == pytest.approx(table["lr"])
    assert tuned.algorithms["fedavg"] == load_preset("digits-10-het").algorithms["fedavg"]


@pytest.mark.parametrize("algorithm,needle", [("nope", "unknown algorithm 'nope'"), ("fedavg", "nothing left")])
def test_tune_rejects_unknown_algorithm_or_empty_space(
    algorithm: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--set", "lr=0.001"] if algorithm == "fedavg" else []
    argv = ["tune", *TUNE, *extra, "--algorithm", algorithm, "--trials", "2", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_diverging_trials_are_pruned_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedbayes.engine as engine
    from simulations.tune import make_spec, tune

    calls: list[int] = []

    def fake(exp: Any, out: Any, *, on_round: Any = None, **_: Any) -> list[dict[str, Any]]:
        calls.append(1)
        if len(calls) == 1:
            raise FloatingPointError("IVON diverged")
        if len(calls) == 2:
            on_round({"round": 1, "val_nll": math.nan})
        row = {"round": 1, "val_nll": 1.0 / len(calls)}
        on_round(row)
        return [row]

    monkeypatch.setattr(engine, "run_experiment", fake)
    spec = make_spec("digits-10-het", "fedadmm", 3, rounds=2, out=tmp_path / "d", quiet=True,
                     sets={"num-clients": 2})
    info = tune(spec)
    assert info["trials"]["pruned"] == 2 and info["trials"]["complete"] == 1
    assert info["best"]["value"] == pytest.approx(1 / 3)
    assert any("importance.png: skipped" in n for n in info["notes"])


def test_a_fresh_study_starts_at_the_presets_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trial 0 evaluates the preset's own values of the searched keys (every method starts from its preset)."""
    import fedbayes.engine as engine
    from simulations.tune import make_spec, tune

    seen: list[dict[str, Any]] = []

    def fake(exp: Any, out: Any, *, on_round: Any = None, **_: Any) -> list[dict[str, Any]]:
        flat = exp.to_flat()
        seen.append({"lr": flat["lr"], "rho": flat["rho"]})
        row = {"round": 1, "val_nll": float(flat["lr"])}
        on_round(row)
        return [row]

    monkeypatch.setattr(engine, "run_experiment", fake)
    spec = make_spec("digits-10-het", "fedadmm", 3, rounds=2, out=tmp_path / "d", quiet=True,
                     sets={"num-clients": 2})
    preset = load_preset("digits-10-het").algorithms["fedadmm"]
    tune(spec)
    assert seen[0] == {"lr": pytest.approx(preset["lr"]), "rho": pytest.approx(preset["rho"])}
    assert len(seen) == 3 and seen[1] != seen[0]
    tune(make_spec("digits-10-het", "fedadmm", 4, rounds=2, out=tmp_path / "d", quiet=True, sets={"num-clients": 2}))
    assert len(seen) == 4 and seen[3] != seen[0]  # a continued study is not restarted at the preset


def test_validation_fraction_above_one_half_only_from_unused_examples() -> None:
    fed = Federation.build(resolve({**FAST, "train-fraction": 0.5, "validation-fraction": 0.9}))
    assert fed.validation is not None and fed.validation.source == "unused"
    assert len(fed.validation.rows) == round(0.9 * len(_client_rows(fed)))
    with pytest.raises(ValueError, match=r"validation-fraction 0\.6 needs .* < 0\.5"):
        Federation.build(resolve({**FAST, "validation-fraction": 0.6}))
    with pytest.raises(ConfigError, match="validation"):
        resolve({**FAST, "validation-fraction": 1.5})


def test_parallel_workers_run_the_enqueued_preset_point_once(tmp_path: Path) -> None:
    """With --jobs 2 a fresh study's trial 0 (the preset's point, enqueued) runs in one process before the
    workers start: two workers once both took it, and the second died on "Cannot tell a COMPLETE trial"."""
    out = tmp_path / "study"
    assert main(["tune", *TUNE, "--algorithm", "fedavg", "--trials", "4", "--jobs", "2", "--out", str(out)]) == 0
    con = sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT number, state, datetime_start, datetime_complete FROM trials "
                           "ORDER BY number").fetchall()
    finally:
        con.close()
    assert all(r[1] in ("COMPLETE", "PRUNED") for r in rows), rows
    assert len(rows) == 4
    first_done = rows[0][3]
    assert all(r[2] >= first_done for r in rows[1:]), rows  # nothing started before trial 0 finished
