"""Flower runs that are interrupted, lose clients or get garbage: resume from a checkpoint, replies that never come,
replies that are garbage.

In process (a loopback grid runs the real ServerApp and ClientApp in this process; seconds):

* a run resumed with ``resume-from`` ends bit-identical to an uninterrupted one (metrics, posterior, config,
  checkpoint), also across engines (the in-process engine's checkpoint resumed by the ServerApp and vice versa);
* a damaged checkpoint, a missing one, or a run config of another experiment stops the ServerApp with a clear error
  before any message is sent, and the folder is left byte for byte as it was;
* replies that never come are ``failed`` and the rest of the run equals the engine's with those clients failing;
* node config ``fault="garbage"`` acts only with ``FEDBAYES_TEST_FAULTS=1``.

Real Flower processes (``slow``):

* the simulation runtime: 2 rounds, then resumed to 3, equals the in-process engine's uninterrupted 3 rounds;
* a loopback deployment with 3 SuperNodes and ``round-timeout``: one SuperNode is SIGKILLed (by PID) after round 1;
  the run completes, that client is ``failed`` in rounds 2 and 3, the folder is complete, and the posterior equals
  the engine's with the recorded failures;
* a loopback deployment where one SuperNode replies garbage (NaN, then wrong shapes): it is ``failed`` every round
  and the posterior equals the engine's run where that client never replied, bit for bit; the same deployment
  then resumes the run to a third round (``resume-from``) and still equals the uninterrupted engine run.

Every process is stopped by PID and checked gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from client.app import app as client_app
from client.task import FAULTS_ENV, garbage_reply, node_fault
from fedbayes.config import ConfigError, load_config_file
from fedbayes.engine import run_experiment
from fedbayes.results import CheckpointError, read_metrics, read_posterior
from fedbayes.runconfig import app_run_config, overrides_toml, run_config_overrides
from server.app import main as server_main
from simulations.deployment import LocalDeployment
from simulations.flower_engine import project_root, run_flower_simulation
from simulations.processes import alive, flwr_run

ROOT = project_root()
FLAT: dict[str, Any] = {"algorithm": "bayes-admm", "dataset": "digits", "num-clients": 3, "rounds": 3,
                        "hidden": "16", "epochs": 1, "bma-samples": 4, "seed": 2}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TIMED = ("wall_s", "train_s")


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    """Messages need the process's task identity (Flower's runtimes set it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# ------------------------------------------------------------------------------------------ helpers
Drop = Callable[[int, int], bool]


class LoopbackGrid:
    """A Grid stand-in that runs the ClientApp of each message's node in this process.

    ``drop(round, partition)`` -> True: that train reply never comes (as if the node died or hung past the
    deadline); with ``superlink_error`` the SuperLink answers for the node instead (``NODE_UNAVAILABLE``, sent
    from the SuperLink's node id 1, as Flower does once a node misses its heartbeats).
    """

    def __init__(self, k: int, rc: dict[str, Any], drop: Drop | None = None, superlink_error: bool = False) -> None:
        self.contexts = {100 + 7 * i: Context(run_id=1, node_id=100 + 7 * i, node_config={"partition-id": i},
                                              state=RecordDict(), run_config=rc) for i in range(k)}
        self.drop = drop
        self.superlink_error = superlink_error
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            if msg.metadata.message_type == MessageType.TRAIN and self.drop is not None:
                cfg = msg.content.config_records["config"]
                if self.drop(int(cfg["round"]), int(cfg["partition-id"])):
                    if self.superlink_error:
                        err = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
                        err.metadata.__dict__["_src_node_id"] = 1
                        out.append(err)
                    continue
            try:
                out.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as e:  # what Flower's runtimes do with a raising ClientApp
                out.append(Message(Error(code=2, reason=f"{type(e)}:<'{e}'>"), reply_to=msg))
        return out


def run_config(flat: dict[str, Any], **flower: Any) -> dict[str, Any]:
    """What ``context.run_config`` holds after ``flwr run -c FILE``: every key, with the overrides."""
    return {**app_run_config(), **run_config_overrides(flat, flower)}


def serve(flat: dict[str, Any], drop: Drop | None = None, superlink_error: bool = False, **flower: Any) -> LoopbackGrid:
    """The real ServerApp ``main`` over a loopback grid of ``num-clients`` nodes."""
    rc = run_config(flat, **flower)
    grid = LoopbackGrid(int(flat["num-clients"]), rc, drop, superlink_error)
    server_main(grid, Context(1, 1, {}, RecordDict(), rc))  # type: ignore[arg-type]
    return grid


def engine(flat: dict[str, Any], out: Path, **kw: Any) -> list[dict[str, Any]]:
    return run_experiment(flat, out, progress=False, **kw)


def untimed(rows: list[dict[str, Any]], *drop: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in {*TIMED, *drop}} for r in rows]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def posterior_diff(a: Path, b: Path) -> float:
    pa, pb = read_posterior(a), read_posterior(b)
    assert sorted(pa) == sorted(pb)
    return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


def assert_same_run(got: Path, want: Path) -> None:
    """Bit-identical results folders, except the timings in the metrics rows."""
    assert untimed(read_metrics(got)) == untimed(read_metrics(want))
    pa, pb = read_posterior(got), read_posterior(want)
    assert sorted(pa) == sorted(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert load_config_file(got / "config.json") == load_config_file(want / "config.json")  # but the provenance
    sa, sb = load_file(str(got / "checkpoint" / "state.safetensors")), load_file(
        str(want / "checkpoint" / "state.safetensors"))
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((got / "checkpoint" / "meta.json").read_text())["round"] == read_metrics(want)[-1]["round"]


# ------------------------------------------------------------------------------------------ resume, in process
def test_resume_in_process_is_bit_identical(tmp_path: Path) -> None:
    """ServerApp: 2 rounds, then ``resume-from`` with rounds=3 == an uninterrupted 3-round ServerApp run."""
    full, part = tmp_path / "full", tmp_path / "part"
    serve(FLAT, **{"out-dir": str(full)})
    serve({**FLAT, "rounds": 2}, **{"out-dir": str(part)})
    assert [r["round"] for r in read_metrics(part)] == [1, 2]
    grid = serve(FLAT, **{"out-dir": str(tmp_path / "unused"), "resume-from": str(part)})
    assert not (tmp_path / "unused").exists()  # a resumed run writes into resume-from
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert {int(m.content.config_records["config"]["round"]) for m in train} == {3}  # absolute rounds
    assert_same_run(part, full)
    rows = read_metrics(part)
    assert rows[2]["wall_s"] >= rows[1]["wall_s"]  # wall time continues


@pytest.mark.parametrize("first", ["engine", "flower"])
def test_resume_across_engines(first: str, tmp_path: Path) -> None:
    """The in-process engine's checkpoint resumed by the ServerApp, and the ServerApp's by the engine, end
    bit-identical to the uninterrupted engine run (also with fedprox, sampling and injected failures)."""
    flat = {**FLAT, "algorithm": "fedprox", "num-clients": 4, "clients-per-round": 3, "fail-rate": 0.2}
    engine(flat, tmp_path / "full")
    part = tmp_path / "part"
    if first == "engine":
        engine({**flat, "rounds": 2}, part)
        serve(flat, **{"resume-from": str(part)})
    else:
        serve({**flat, "rounds": 2}, **{"out-dir": str(part)})
        engine(flat, part, resume=True)
    assert_same_run(part, tmp_path / "full")


def _damage(kind: str, folder: Path) -> str:
    ck = folder / "checkpoint"
    if kind == "truncated":
        data = (ck / "state.safetensors").read_bytes()
        (ck / "state.safetensors").write_bytes(data[: len(data) // 2])
        return "corrupted or truncated"
    if kind == "flipped":
        data = bytearray((ck / "state.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (ck / "state.safetensors").write_bytes(bytes(data))
        return "corrupted or truncated"
    if kind == "meta-json":
        (ck / "meta.json").write_text('{"round": 2, "config": {')
        return "meta.json is corrupted"
    if kind == "missing":
        (ck / "state.safetensors").unlink()
        return "no checkpoint in"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "flipped", "meta-json", "missing"])
def test_damaged_checkpoint_stops_the_server_app_and_keeps_the_folder(kind: str, tmp_path: Path) -> None:
    part = tmp_path / "part"
    engine({**FLAT, "rounds": 2}, part)
    expect = _damage(kind, part)
    before = digest(part)
    with pytest.raises(CheckpointError) as err:
        serve(FLAT, **{"resume-from": str(part)})
    msg = str(err.value)
    assert f"cannot resume from {part.resolve()}" in msg and expect in msg and "Nothing was written" in msg, msg
    assert digest(part) == before


def test_resume_refuses_another_experiment_and_a_missing_folder(tmp_path: Path) -> None:
    part = tmp_path / "part"
    engine({**FLAT, "rounds": 2}, part)
    before = digest(part)
    with pytest.raises(ConfigError) as err:  # the ClientApps would build another model: refused, naming the keys
        serve({**FLAT, "hidden": "32", "seed": 5}, **{"resume-from": str(part)})
    assert "hidden=[32] (checkpoint: [16])" in str(err.value) and "seed=5" in str(err.value)
    with pytest.raises(CheckpointError, match="no such results folder"):
        serve(FLAT, **{"resume-from": str(tmp_path / "nowhere")})
    grid = serve({**FLAT, "rounds": 2}, **{"resume-from": str(part)})  # nothing left to do
    assert grid.sent == [] and digest(part) == before
    serve({**FLAT, "round-timeout": 30.0}, **{"resume-from": str(part)})  # round-timeout may change
    assert json.loads((part / "config.json").read_text())["round-timeout"] == 30.0


# ------------------------------------------------------------------------------------------ missing and bad replies
@pytest.mark.parametrize("superlink_error", [False, True], ids=["silence", "node-unavailable"])
def test_replies_that_never_come_are_failed_and_the_run_goes_on(superlink_error: bool, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Client 2's replies never come from round 2 on (silence until the deadline, or the SuperLink's
    NODE_UNAVAILABLE error from its own node id): it is failed there, keeps its stale site (the result equals the
    engine's with that failure), and the run completes."""
    def gone(r: int, c: int) -> bool:
        return r >= 2 and c == 2

    with caplog.at_level("WARNING", logger="flwr"):
        serve({**FLAT, "round-timeout": 5.0}, gone, superlink_error, **{"out-dir": str(tmp_path / "flower")})
    if superlink_error:
        said = "round 2: dropped reply of client 2: no reply, the SuperLink says: Error: Node Unavailable"
        assert said in caplog.text
        assert "unexpected node" not in caplog.text
    else:
        assert "round 2: no reply from client 2 within round-timeout" in caplog.text
    rows = read_metrics(tmp_path / "flower")
    assert [(r["participants"], r["failed"]) for r in rows] == [([0, 1, 2], []), ([0, 1], [2]), ([0, 1], [2])]
    engine({**FLAT, "round-timeout": 5.0}, tmp_path / "engine", fail=gone)
    assert untimed(rows, "bytes_up") == untimed(read_metrics(tmp_path / "engine"), "bytes_up")
    assert posterior_diff(tmp_path / "flower", tmp_path / "engine") == 0.0


def test_fault_injection_needs_the_environment_variable(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    with caplog.at_level("WARNING", logger="flwr"):
        assert node_fault({"partition-id": 0, "fault": "garbage"}) is None
    assert "ignored" in caplog.text and FAULTS_ENV in caplog.text
    monkeypatch.setenv(FAULTS_ENV, "1")
    assert node_fault({"partition-id": 0, "fault": "garbage"}) == "garbage"
    assert node_fault({"partition-id": 0}) is None
    with pytest.raises(ValueError, match="'fault' must be one of"):
        node_fault({"fault": "explode"})
    prior = {"prior.eta": {"w": np.zeros((3, 2), np.float32)}}
    nan, _ = garbage_reply(prior, {"reply": "site", "round": 1}, 5)
    assert set(nan) == {"site.eta", "site.prec"} and np.isnan(nan["site.eta"]["w"]).all()
    wrong, _ = garbage_reply(prior, {"reply": "mean", "round": 2}, 5)
    assert set(wrong) == {"mean"} and wrong["mean"]["w"].shape == (4, 2)


def test_garbage_node_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """The garbage node's replies (NaN, then wrong shapes) are dropped every round with the reason; the run equals
    the engine's without that client."""
    monkeypatch.setenv(FAULTS_ENV, "1")
    flat = {**FLAT, "rounds": 2}
    rc = run_config(flat, **{"out-dir": str(tmp_path / "flower")})
    grid = LoopbackGrid(3, rc)
    grid.contexts[107].node_config["fault"] = "garbage"  # partition 1
    with caplog.at_level("WARNING", logger="flwr"):
        server_main(grid, Context(1, 1, {}, RecordDict(), rc))  # type: ignore[arg-type]
    assert "round 1: dropped reply of client 1: invalid reply: record 'site.eta'" in caplog.text
    assert "round 2: dropped reply of client 1: invalid reply: record 'site.eta'" in caplog.text
    assert "has NaN or Inf" in caplog.text and "has shape" in caplog.text
    rows = read_metrics(tmp_path / "flower")
    assert [(r["participants"], r["failed"]) for r in rows] == [([0, 2], [1])] * 2
    engine(flat, tmp_path / "engine", fail=lambda r, c: c == 1)
    assert posterior_diff(tmp_path / "flower", tmp_path / "engine") == 0.0


# ------------------------------------------------------------------------------------------ real processes
def _assert_all_stopped(pids: set[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    assert not left, f"processes still running: {left}"


def _rc_file(path: Path, flat: dict[str, Any], **flower: Any) -> Path:
    path.write_text(overrides_toml(run_config_overrides(flat, {"node-wait-s": 120.0, **flower})))
    return path


def _engine_with_recorded_failures(flat: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> None:
    failed = {(int(r["round"]), int(c)) for r in rows for c in r["failed"]}
    engine(flat, out, fail=lambda r, c: (r, c) in failed)


def _rounds_written(out: Path) -> int:
    """Complete lines in ``metrics.jsonl`` (the file may be mid-append)."""
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _check_complete(out: Path, rounds: int) -> list[dict[str, Any]]:
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert (out / "config.json").exists() and (out / "posterior.safetensors").exists()
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["round"] == rounds
    return rows


@pytest.mark.slow
def test_simulation_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Flower's simulation runtime: 2 rounds, then ``resume-from`` to 3 rounds; equals the engine's 3 rounds."""
    out = tmp_path / "flower"
    t0 = time.perf_counter()
    run_flower_simulation({**FLAT, "rounds": 2}, out, num_supernodes=3, echo=False, timeout_s=400)
    t1 = time.perf_counter()
    rows = run_flower_simulation(FLAT, out, num_supernodes=3, echo=False, timeout_s=400, resume=True)
    t2 = time.perf_counter()
    assert [r["round"] for r in rows] == [1, 2, 3]
    engine(FLAT, tmp_path / "engine")
    diff = posterior_diff(out, tmp_path / "engine")
    print(f"simulation: 2 rounds {t1 - t0:.1f} s, resumed 3rd round {t2 - t1:.1f} s; "
          f"max |posterior resumed - uninterrupted engine| = {diff:.3g}")
    assert diff <= 1e-6
    assert [(r["participants"], r["failed"]) for r in rows] == [(r["participants"], r["failed"])
                                                               for r in read_metrics(tmp_path / "engine")]


@pytest.mark.slow
def test_deployment_survives_a_killed_supernode(tmp_path: Path) -> None:
    """3 SuperNodes, bayes-admm, 3 rounds, round-timeout 60 s: SuperNode 2 is SIGKILLed right after round 1."""
    out = tmp_path / "results"
    flat = {**FLAT, "round-timeout": 60.0}
    rc = _rc_file(tmp_path / "rc.toml", flat, **{"out-dir": str(out)})
    dep = LocalDeployment(tmp_path / "deploy", [f"partition-id={i} num-partitions=3" for i in range(3)],
                          env_extra=ONE_THREAD)
    pids: set[int] = set()
    result: dict[str, int] = {}
    marks: dict[str, float] = {}
    try:
        dep.start()
        t0 = time.perf_counter()
        runner = threading.Thread(target=lambda: result.update(rc=flwr_run(
            ROOT, dep.connection, dep.env(), tmp_path / "run.log", run_config=rc, timeout_s=480)))
        runner.start()
        while runner.is_alive() and _rounds_written(out) < 1:
            time.sleep(0.2)
        assert _rounds_written(out) >= 1, (tmp_path / "run.log").read_text(errors="replace")[-4000:]
        marks["round 1 done"] = time.perf_counter() - t0
        pids = dep.all_pids()
        dep.kill_node(2)
        assert not alive(dep.node(2).pid)
        runner.join(timeout=600)
        marks["run done"] = time.perf_counter() - t0
        log = (tmp_path / "run.log").read_text(errors="replace")
        assert result.get("rc") == 0 and "fedbayes: results in" in log, f"{log[-4000:]}\n{dep.logs()}"
        pids |= dep.all_pids()
    finally:
        dep.stop()
    _assert_all_stopped(pids)
    rows = _check_complete(out, 3)
    print(f"deployment, SuperNode 2 killed: {marks}; rows: "
          f"{[(r['round'], r['participants'], r['failed'], round(r['wall_s'], 1)) for r in rows]}")
    assert rows[0]["participants"] == [0, 1, 2] and rows[0]["failed"] == []
    for r in rows[1:]:
        assert 2 in r["failed"] and 2 not in r["participants"]
    assert sum(len(r["participants"]) for r in rows[1:]) >= 2, "the live clients must keep training"
    _engine_with_recorded_failures(flat, rows, tmp_path / "engine")
    diff = posterior_diff(out, tmp_path / "engine")
    print(f"max |posterior deployment - engine with the same failures| = {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_deployment_garbage_node_then_resume(tmp_path: Path) -> None:
    """2 SuperNodes, one replying garbage (NaN in round 1, wrong shapes in round 2; FEDBAYES_TEST_FAULTS=1): it is
    failed every round and the posterior equals, bit for bit, the engine run where that client never replied.  Then
    the same deployment resumes the run to round 3 (``resume-from``): equal to the uninterrupted engine run."""
    out = tmp_path / "results"
    flat = {**FLAT, "num-clients": 2}
    dep = LocalDeployment(tmp_path / "deploy", ["partition-id=0 num-partitions=2",
                                                'partition-id=1 num-partitions=2 fault="garbage"'],
                          env_extra={**ONE_THREAD, FAULTS_ENV: "1"})
    pids: set[int] = set()
    try:
        dep.start()
        t0 = time.perf_counter()
        rc = flwr_run(ROOT, dep.connection, dep.env(), tmp_path / "run.log", timeout_s=400,
                      run_config=_rc_file(tmp_path / "rc.toml", {**flat, "rounds": 2}, **{"out-dir": str(out)}))
        t1 = time.perf_counter()
        log = (tmp_path / "run.log").read_text(errors="replace")
        assert rc == 0 and "fedbayes: results in" in log, f"{log[-4000:]}\n{dep.logs()}"
        rc2 = flwr_run(ROOT, dep.connection, dep.env(), tmp_path / "resume.log", timeout_s=300,
                       run_config=_rc_file(tmp_path / "rc2.toml", flat, **{"resume-from": str(out)}))
        t2 = time.perf_counter()
        log2 = (tmp_path / "resume.log").read_text(errors="replace")
        assert rc2 == 0 and "fedbayes: results in" in log2, f"{log2[-4000:]}\n{dep.logs()}"
        pids = dep.all_pids()
    finally:
        dep.stop()
    _assert_all_stopped(pids)
    assert "has NaN or Inf" in log and "has shape" in log  # both kinds of garbage, dropped with the reason
    rows = _check_complete(out, 3)
    print(f"deployment, garbage node: 2 rounds {t1 - t0:.1f} s, resumed 3rd round {t2 - t1:.1f} s")
    assert [(r["participants"], r["failed"]) for r in rows] == [([0], [1])] * 3
    engine(flat, tmp_path / "engine", fail=lambda r, c: c == 1)
    diff = posterior_diff(out, tmp_path / "engine")
    print(f"max |posterior deployment (garbage, resumed) - engine (client 1 never replies)| = {diff:.3g}")
    assert diff == 0.0
    # the deployment's garbage replies carry their reason; the engine's lost replies (never arrived) carry none
    assert all(set(r["failed_reasons"]) == {"1"} for r in rows)
    assert untimed(rows, "bytes_up", "failed_reasons") == untimed(
        read_metrics(tmp_path / "engine"), "bytes_up", "failed_reasons")


def test_fault_env_is_not_set_in_this_process() -> None:
    """Production guard: nothing in the test session turns fault injection on globally."""
    assert os.environ.get(FAULTS_ENV) != "1"
