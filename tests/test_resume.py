"""Crash safety: a run killed with SIGKILL at a random point and resumed ends bit-identical to an uninterrupted
run; a truncated or corrupted checkpoint gives a clear error and is not overwritten."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedbayes.engine import run_experiment
from fedbayes.results import CheckpointError, load_checkpoint

ROUNDS = 40  # rounds take ~30 ms here: enough of them that the random kill lands mid-run
CFG = ["--algorithm", "bayes-admm", "--dataset", "digits", "--clients", "4", "--rounds", str(ROUNDS),
       "--set", "hidden=16", "--set", "epochs=2", "--set", "rho=0.5", "--set", "damping=0.3",
       "--set", "clients-per-round=0.75", "--set", "fail-rate=0.2", "--quiet"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedbayes", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    subprocess.run(_cli("run", *CFG, "--out", str(ref)), check=True, env=_env(), timeout=600)
    rng = random.Random(os.getpid())
    proc = subprocess.Popen(_cli("run", *CFG, "--out", str(crashed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = rng.randint(1, ROUNDS // 4)  # kill somewhere after round `target` was checkpointed
        meta = crashed / "checkpoint" / "meta.json"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(meta.read_text())["round"] >= target:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = json.loads((crashed / "checkpoint" / "meta.json").read_text())["round"]
    assert 1 <= killed_at < ROUNDS
    subprocess.run(_cli("run", "--resume", str(crashed), "--quiet"), check=True, env=_env(), timeout=600)
    assert (ref / "posterior.safetensors").read_bytes() == (crashed / "posterior.safetensors").read_bytes()
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    new_rows = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    drop = ("wall_s", "train_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ref_rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in new_rows]


def _small(out: Path) -> None:
    run_experiment({"algorithm": "pvi", "dataset": "digits", "num-clients": 3, "rounds": 2, "hidden": "8",
                    "epochs": 1}, out, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_checkpoint_is_reported_and_kept(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    _small(run)
    state = run / "checkpoint" / "state.safetensors"
    meta = run / "checkpoint" / "meta.json"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[-10] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        meta.write_text(meta.read_text()[:-20])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"corrupted|cannot be read|truncated"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError):
        run_experiment({"rounds": 4}, run, resume=True, progress=False)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_missing_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


GOLDEN = Path(__file__).resolve().parent / "data" / "checkpoint-v1"


def _no_timings(rows: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("seconds"))} for r in rows]


@pytest.mark.parametrize("algo", ["bayes-admm", "feddyn"])
def test_a_checkpoint_written_by_an_earlier_version_resumes(algo: str, tmp_path: Path) -> None:
    """``tests/data/checkpoint-v1``: runs stopped after round 2 of 3 (digits, 3 clients, partial participation),
    written by the code of December 2026, with the uninterrupted run's posterior and metrics.  The current code
    must read the checkpoint and finish the run as that code did (a changed checkpoint layout needs a migration).

    Bit-identical on the machine that wrote the files; on another CPU, torch's float32 kernels round differently
    (1.7e-7 relative on round 3's posterior, 7e-9 on its NLL, measured on a second machine), so round 3 is compared
    to 1e-5 relative.  A misread state (a wrong key, dual, site or start) moves it by orders of magnitude more, and
    the rows of rounds 1-2 (read back from the checkpoint) must be identical."""
    import shutil

    from safetensors.torch import load_file

    from fedbayes.results import read_metrics, read_posterior

    run = tmp_path / algo
    shutil.copytree(GOLDEN / algo, run)
    config = json.loads((run / "config.json").read_text())
    rows = run_experiment(config, run, progress=False, resume=True)
    assert [r["round"] for r in rows] == [1, 2, 3]
    want = load_file(str(GOLDEN / algo / "expected-posterior.safetensors"))
    got = read_posterior(run)
    assert sorted(got) == sorted(want)
    for k in want:
        scale = float(want[k].abs().max())
        assert float((got[k] - want[k]).abs().max()) <= 1e-5 * scale, k
    expected = _no_timings([json.loads(line) for line in (GOLDEN / algo / "expected-metrics.jsonl").read_text()
                            .splitlines()])
    have = _no_timings(read_metrics(run))
    assert have[:2] == expected[:2]  # the checkpoint's rows, as written
    assert have[2].keys() == expected[2].keys()
    for key, v in expected[2].items():
        if isinstance(v, float):
            assert have[2][key] == pytest.approx(v, rel=1e-5, abs=1e-9), key
        else:
            assert have[2][key] == v, key


def test_a_kill_between_the_meta_and_the_state_rename_still_resumes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The window that made a SIGKILLed run unresumable: the new meta is written, the state not yet in place."""
    import fedbayes.results as results

    ref = tmp_path / "ref"
    run_experiment({"algorithm": "pvi", "dataset": "digits", "num-clients": 3, "rounds": 3, "hidden": "8",
                    "epochs": 1}, ref, progress=False)
    run = tmp_path / "run"
    flat = {"algorithm": "pvi", "dataset": "digits", "num-clients": 3, "rounds": 3, "hidden": "8", "epochs": 1}
    run_experiment(flat, run, progress=False, stop_round=1)
    real_replace = os.replace

    def killed(src, dst):  # type: ignore[no-untyped-def]
        if str(src).endswith(results.NEXT_STATE):
            raise KeyboardInterrupt("killed before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(flat, run, progress=False, resume=True, stop_round=2)
    monkeypatch.setattr(results.os, "replace", real_replace)
    meta, _ = load_checkpoint(run)
    assert meta["round"] == 2 and (run / "checkpoint" / results.NEXT_STATE).exists()
    run_experiment(flat, run, progress=False, resume=True)
    assert (ref / "posterior.safetensors").read_bytes() == (run / "posterior.safetensors").read_bytes()
    assert not (run / "checkpoint" / results.NEXT_STATE).exists()


class _Killed(BaseException):
    """A simulated SIGKILL: not an ``Exception``, so no ``except`` in the code under test can swallow it."""


def _kill_config(store: str) -> dict:  # type: ignore[type-arg]
    return {"algorithm": "bayes-admm", "dataset": "synthetic-classification", "num-clients": 3, "rounds": 2,
            "hidden": "8", "epochs": 1, "bma-samples": 0, "seed": 5, "store": store, "clients-per-round": 2 / 3,
            "eval-every": 2}


def _resume_killed(cfg: dict, run: Path, step: int, after: bool,  # type: ignore[type-arg]
                   monkeypatch: pytest.MonkeyPatch) -> bool:
    """Resume ``run`` and kill it at its ``step``-th ``os.replace`` (just before it, or just ``after`` it); False
    when the run got through (fewer steps)."""
    real_replace = os.replace
    calls = {"n": 0}

    def killing(src, dst):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == step + 1 and not after:
            raise _Killed(f"{src} -> {dst}")
        real_replace(src, dst)
        if calls["n"] == step + 1:
            raise _Killed(f"{src} -> {dst}")

    monkeypatch.setattr(os, "replace", killing)
    try:
        run_experiment(cfg, run, progress=False, resume=True)
    except _Killed:
        return True
    finally:
        monkeypatch.setattr(os, "replace", real_replace)
    return False


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_kill_at_every_write_step_of_a_checkpoint_resumes_identically(
        store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file a run writes reaches its final name through ``os.replace``: the metrics and config, the
    posterior, the client files (written by the checkpoint with ``store = "memory"``, during the round with
    ``"disk"``), ``state.next.safetensors``, ``meta.json`` and the state's rename.  From the checkpoint of round 1,
    the resumed run (round 2 of 2, 2 of 3 clients) is killed just before its i-th ``os.replace`` for every i
    until it gets through, and just after the last one (before the superseded files are deleted), then resumed
    again: each ends with the posterior, metrics and checkpoint of the uninterrupted run.

    Caught mutations (each fails at step 6, the kill just before the meta, or the resume after it):

    the meta written before the state it names (the digest taken of the bytes in memory); a kill in between leaves
    a meta whose digest matches no state file, ``CheckpointError: … corrupted or truncated``::

        -            _atomic_save_tensors(nxt, server)
        +            _blob = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in server.items()})
        -                "state_sha256": _sha256(nxt),
        +                "state_sha256": hashlib.sha256(_blob).hexdigest(),
                     atomic_write_bytes(ck / "meta.json", blob)
        +            atomic_write_bytes(nxt, _blob)

    the superseded client files deleted before the new meta is durable; the old meta then names deleted files,
    ``CheckpointError: … client 0's state file … is missing``::

        +            files.commit()
                     atomic_write_bytes(ck / "meta.json", blob)
    """
    import shutil

    from fedbayes.results import read_metrics

    cfg = _kill_config(store)
    ref, base = tmp_path / "ref", tmp_path / "base"
    run_experiment(cfg, ref, progress=False)
    run_experiment(cfg, base, progress=False, stop_round=1)
    want_post = (ref / "posterior.safetensors").read_bytes()
    want_rows = _no_timings(read_metrics(ref))
    want_state = load_checkpoint(ref)[1]
    step, after, tried = 0, False, []
    while True:
        run = tmp_path / f"kill-{step}-{after}"
        shutil.copytree(base, run)
        if not _resume_killed(cfg, run, step, after, monkeypatch):
            assert not after
            step, after = step - 1, True  # got through: now kill just after the last step
            continue
        tried.append((step, after))
        run_experiment(cfg, run, progress=False, resume=True)
        where = f"killed {'after' if after else 'before'} write step {step}"
        assert (run / "posterior.safetensors").read_bytes() == want_post, where
        assert _no_timings(read_metrics(run)) == want_rows, where
        got_state = load_checkpoint(run)[1]
        assert got_state.keys() == want_state.keys(), where
        assert all(torch.equal(got_state[k], want_state[k]) for k in want_state), where
        shutil.rmtree(run)
        if after:
            break
        step += 1
    # metrics, config, posterior, two clients, state, meta, rename; and after the rename
    assert len(tried) == 9, tried
