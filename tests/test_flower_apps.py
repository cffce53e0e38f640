"""The ServerApp, strategy and ClientApp in one process (no Flower runtime): a loopback grid hands each message to
the real ClientApp with its node's Context.  Fast checks of identity mapping, reply validation, bad input and
the run config; the real runtimes are in test_flower_equivalence.py, test_flower_deploy.py, test_flower_compose.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.task import node_spec
from fedbayes.config import ConfigError, resolve
from fedbayes.engine import run_experiment
from fedbayes.federation import Federation
from fedbayes.protocol import encode_task
from fedbayes.results import read_metrics, read_posterior
from fedbayes.rounds import client_config
from fedbayes.runconfig import (
    DEMO_DEFAULTS,
    FLOWER_KEYS,
    app_run_config,
    overrides_toml,
    pyproject_run_config,
    pyproject_section,
    run_config_overrides,
    split_run_config,
)
from server.app import main as server_main
from simulations.flower_engine import project_root

ROOT = project_root()
PYPROJECT_CFG: dict[str, Any] = {}
for _k, _v in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"].items():
    if isinstance(_v, dict):
        PYPROJECT_CFG.update({f"{_k}.{k}": v for k, v in _v.items()})
    else:
        PYPROJECT_CFG[_k] = _v
FLAT = {"algorithm": "bayes-admm", "dataset": "digits", "num-clients": 4, "rounds": 2, "hidden": "16", "epochs": 1,
        "bma-samples": 4, "seed": 1}
NODE_IDS = [9_000_000_017, 12, 4_242, 77]  # Flower node ids: unrelated to partition ids


@pytest.fixture(autouse=True)
def _one_thread() -> Iterable[None]:
    """Engine and loopback ServerApp in one process, one torch thread (fast and steady on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    """Messages need the process's task identity (Flower's runtimes set it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_config(flat: dict[str, Any], **flower: Any) -> dict[str, Any]:
    """What ``context.run_config`` holds after ``flwr run -c FILE``: pyproject's keys with the overrides."""
    return {**PYPROJECT_CFG, **run_config_overrides(flat, flower)}


Tamper = Callable[[Message, Message, int], Message]


class LoopbackGrid:
    """A Grid stand-in: ``send_and_receive`` runs the ClientApp of each message's node, in this process."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], rc: dict[str, Any], tamper: Tamper | None = None):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config=rc)
                         for n, cfg in node_configs.items()}
        self.tamper = tamper
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            try:
                reply = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # what Flower's runtimes do with a raising ClientApp
                reply = Message(Error(code=2, reason=f"{type(e)}:<'{e}'>"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(msg, reply, len(self.sent))
            out.append(reply)
        return out


def _nodes(k: int = 4) -> dict[int, dict[str, Any]]:
    return {NODE_IDS[i]: {"partition-id": (i * 3) % k, "num-partitions": k} for i in range(k)}  # shuffled


def _engine(flat: dict[str, Any], out: Path, **kw: Any) -> list[dict[str, Any]]:
    return run_experiment(flat, out, progress=False, **kw)


def _strip(rows: list[dict[str, Any]], *drop: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in {"wall_s", "train_s", *drop}} for r in rows]


# ------------------------------------------------------------------------------------------ server + client
@pytest.mark.parametrize("extra", [{}, {"fail-rate": 0.3, "straggler-rate": 0.2, "exclude-clients": "2",
                                      "clients-per-round": 2, "algorithm": "fedprox"},
                                   {"validation-fraction": 0.1, "eval-split": "validation"}])
def test_server_app_in_process_equals_engine(tmp_path: Path, extra: dict[str, Any]) -> None:
    """Shuffled node ids, identity by partition-id: the ServerApp writes the engine's results, bit for bit
    (also with sampled, excluded and injected-failure clients)."""
    flat = {**FLAT, **extra}
    eng = _engine(flat, tmp_path / "engine")
    grid = LoopbackGrid(_nodes(), run_config(flat, **{"out-dir": str(tmp_path / "flower")}))
    server_main(grid, Context(1, 1, {}, RecordDict(), grid.contexts[NODE_IDS[0]].run_config))  # type: ignore[arg-type]
    flw = read_metrics(tmp_path / "flower")
    assert _strip(flw) == _strip(eng)
    pa, pb = read_posterior(tmp_path / "engine"), read_posterior(tmp_path / "flower")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (tmp_path / "flower" / "checkpoint" / "meta.json").exists()
    if "eval-split" in extra:  # evaluated on the same validation split, with val_* keys
        assert "val_nll" in flw[-1] and (tmp_path / "flower" / "split.json").read_text() == (
            tmp_path / "engine" / "split.json").read_text()
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == sum(len(r["participants"]) for r in eng)  # one message per client that trained
    if not extra or "eval-split" in extra:
        assert {m.content.config_records["config"]["partition-id"] for m in train} == {0, 1, 2, 3}
    else:
        assert any(r["failed"] for r in eng) and all(2 not in r["participants"] for r in eng)
    for m in train:  # each message goes to the node holding that partition
        pid = grid.contexts[m.metadata.dst_node_id].node_config["partition-id"]
        assert m.content.config_records["config"]["partition-id"] == pid
        assert set(m.content.array_records) >= {"prior.eta", "prior.prec"}


def test_bad_reply_is_dropped_and_the_round_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Round 1: partition 1 replies a negative precision, partition 2's ClientApp fails; both dropped and logged.
    The result equals the engine's with those two replies lost."""
    node_of = {cfg["partition-id"]: n for n, cfg in _nodes().items()}

    def tamper(msg: Message, reply: Message, _: int) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return reply
        cfg = msg.content.config_records["config"]
        if cfg["round"] == 1 and cfg["partition-id"] == 1:
            rec = reply.content.array_records["site.prec"]
            reply.content["site.prec"] = ArrayRecord({k: Array(-np.abs(a.numpy()) - 1.0) for k, a in rec.items()})
        if cfg["round"] == 1 and cfg["partition-id"] == 2:
            return Message(Error(code=2, reason="boom"), reply_to=msg)
        return reply

    grid = LoopbackGrid(_nodes(), run_config(FLAT, **{"out-dir": str(tmp_path / "flower")}), tamper)
    with caplog.at_level("WARNING", logger="flwr"):
        server_main(grid, Context(1, 1, {}, RecordDict(), grid.contexts[node_of[0]].run_config))  # type: ignore[arg-type]
    # bayes-admm sites are signed: a reply is dropped when prior + site is not a proper precision
    assert "dropped reply of client 1: invalid reply: record 'site.prec'" in caplog.text
    assert "posterior precision" in caplog.text
    assert "dropped reply of client 2: the ClientApp failed: boom" in caplog.text
    rows = read_metrics(tmp_path / "flower")
    assert rows[0]["participants"] == [0, 3] and rows[0]["failed"] == [1, 2]
    assert rows[1]["participants"] == [0, 1, 2, 3] and rows[1]["failed"] == []
    eng = _engine(FLAT, tmp_path / "engine", fail=lambda r, c: r == 1 and c in (1, 2))
    assert _strip(rows, "bytes_up", "failed_reasons") == _strip(eng, "bytes_up", "failed_reasons")
    assert set(rows[0]["failed_reasons"]) == {"1", "2"}  # real failures carry their reason; injected ones none
    pa, pb = read_posterior(tmp_path / "engine"), read_posterior(tmp_path / "flower")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_node_with_bad_config_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node with partition-id out of range is refused at the query (logged, naming the key); its partition
    counts as failed every round, the others train."""
    flat = {**FLAT, "num-clients": 3, "rounds": 1}
    nodes = {5: {"partition-id": 0}, 6: {"partition-id": 1}, 7: {"partition-id": 3}}
    grid = LoopbackGrid(nodes, run_config(flat, **{"out-dir": str(tmp_path / "o"), "node-wait-s": 0.0}))
    with caplog.at_level("WARNING", logger="flwr"):
        server_main(grid, Context(1, 1, {}, RecordDict(), grid.contexts[5].run_config))  # type: ignore[arg-type]
    assert "'partition-id'=3 is out of range [0, 3)" in caplog.text
    rows = read_metrics(tmp_path / "o")
    assert rows[0]["participants"] == [0, 1] and rows[0]["failed"] == [2]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", [{"learning-rate": 0.1}, {"bayes-admm.rhoo": 0.3}, {"fedfoo.mu": 1.0},
                                 {"node-wait-s": "soon"}, {"epochs": "many"}])
def test_server_app_unknown_key_fails_naming_it_and_keeps_results(tmp_path: Path, bad: dict[str, Any]) -> None:
    out = tmp_path / "earlier"
    _engine({**FLAT, "rounds": 1}, out)
    before = _digest(out)
    rc = {**run_config(FLAT, **{"out-dir": str(out)}), **bad}
    grid = LoopbackGrid(_nodes(), rc)
    with pytest.raises(ConfigError) as err:
        server_main(grid, Context(1, 1, {}, RecordDict(), rc))  # type: ignore[arg-type]
    assert next(iter(bad)) in str(err.value)
    assert grid.sent == [] and _digest(out) == before


# ------------------------------------------------------------------------------------------ client input
def _train_message(flat: dict[str, Any], client: int, dst: int = 1) -> Message:
    fed = Federation.build(resolve(flat))
    task = fed.rule.configure(client, 1)
    content = RecordDict({n: ArrayRecord({k: Array(v) for k, v in rec.items()})  # keyed by parameter name
                          for n, rec in encode_task(task).items()})
    content["config"] = ConfigRecord({**client_config(fed.exp, fed.rule, task, 1, client),
                                      "experiment": json.dumps(fed.exp.to_flat())})
    msg = Message(content, dst_node_id=dst, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "t1"
    return msg


def _call(node_config: dict[str, Any], flat: dict[str, Any] = FLAT, client: int = 0, kind: str = "train") -> Message:
    ctx = Context(1, 1, node_config, RecordDict(), run_config(flat))
    if kind == "train":
        msg = _train_message(flat, client)
    else:
        config = ConfigRecord({"experiment": json.dumps(resolve(flat).to_flat())})
        msg = Message(RecordDict({"config": config}), dst_node_id=1, message_type=MessageType.QUERY)
        msg.metadata.__dict__["_message_id"] = "q1"
    return client_app(msg, ctx)


@pytest.mark.parametrize(("node_config", "expect"), [
    ({}, "lacks 'partition-id'"),
    ({"partition-id": 4}, "'partition-id'=4 is out of range [0, 4)"),
    ({"partition-id": -1}, "'partition-id'=-1 is out of range"),
    ({"partition-id": "zero"}, "'partition-id' must be an integer"),
    ({"partition-id": 0, "num-partitions": 10}, "'num-partitions'=10 differs from the run config's num-clients=4"),
    ({"partition-id": 0, "device": "tpu"}, "'device' must be one of"),
])
@pytest.mark.parametrize("kind", ["query", "train"])
def test_client_bad_node_config_names_the_problem(node_config: dict[str, Any], expect: str, kind: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        _call(node_config, kind=kind)
    assert expect in str(err.value)


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_client_data_path_problems_name_the_file(tmp_path: Path) -> None:
    fed = Federation.build(resolve(FLAT))
    x, y = (t.numpy() for t in fed.client_data[0])
    cases = {
        "missing": (tmp_path / "nope.npz", "cannot read it"),
        "garbage": (tmp_path / "garbage.npz", "cannot read it as a .npz"),
        "no-y": (_write_npz(tmp_path / "noy.npz", x=x), "must hold arrays 'x' and 'y'"),
        "short-y": (_write_npz(tmp_path / "short.npz", x=x, y=y[:-1]), "'y' must have shape"),
        "labels": (_write_npz(tmp_path / "lab.npz", x=x, y=y + 10), "labels must be in [0, 10)"),
        "1-d x": (_write_npz(tmp_path / "flat.npz", x=x.reshape(len(x), -1)[:, 0], y=y),
                  "'x' must have shape (N, features...)"),
        "nan": (_write_npz(tmp_path / "nan.npz", x=np.full_like(x, np.nan), y=y), "NaN or Inf"),
    }
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    for name, (path, expect) in cases.items():
        for kind in ("query", "train"):
            with pytest.raises(ValueError) as err:
                _call({"partition-id": 0, "data-path": str(path)}, kind=kind)
            assert "'data-path'" in str(err.value) and str(path) in str(err.value), name
            assert expect in str(err.value), (name, str(err.value))
    wide = _write_npz(tmp_path / "wide.npz", x=np.zeros((5, 65), np.float32), y=np.zeros(5, np.int64))
    with pytest.raises(ValueError) as err:
        _call({"partition-id": 0, "data-path": str(wide)})
    assert "(65,)" in str(err.value) and "(1, 8, 8)" in str(err.value)  # the file's example shape and the model's


def test_client_data_path_file_trains_like_its_partition(tmp_path: Path) -> None:
    """The client's own .npz (x: N x D float, y: N int labels) gives the same reply as the rebuilt partition."""
    fed = Federation.build(resolve(FLAT))
    x, y = (t.numpy() for t in fed.client_data[2])
    path = _write_npz(tmp_path / "client2.npz", x=x.reshape(len(x), 8, 8), y=y.astype(np.int32))
    a = _call({"partition-id": 2}, client=2)
    b = _call({"partition-id": 2, "data-path": str(path), "device": "cpu"}, client=2)
    assert set(a.content.array_records) == set(b.content.array_records) == {"site.eta", "site.prec"}
    for name, rec in a.content.array_records.items():
        for k, arr in rec.items():
            assert np.array_equal(arr.numpy(), b.content.array_records[name][k].numpy())
    q = _call({"partition-id": 2, "data-path": str(path)}, kind="query")
    assert q.content.metric_records["metrics"]["num-examples"] == len(x)
    assert q.content.metric_records["metrics"]["own-data"] == 1


def test_message_without_the_resolved_experiment_is_refused() -> None:
    msg = _train_message(FLAT, 0)
    del msg.content.config_records["config"]["experiment"]
    with pytest.raises(ValueError, match="message config lacks 'experiment'"):
        client_app(msg, Context(1, 1, {"partition-id": 0}, RecordDict(), run_config(FLAT)))
    msg = _train_message(FLAT, 0)
    msg.content.config_records["config"]["experiment"] = json.dumps({**resolve(FLAT).to_flat(), "epochs": 0})
    with pytest.raises(ValueError, match="epochs"):
        client_app(msg, Context(1, 1, {"partition-id": 0}, RecordDict(), run_config(FLAT)))


def test_train_message_for_another_partition_is_refused() -> None:
    with pytest.raises(ValueError, match="train message for partition 3 reached the node with partition-id 0"):
        ctx = Context(1, 1, {"partition-id": 0}, RecordDict(), run_config(FLAT))
        client_app(_train_message(FLAT, 3), ctx)


def test_node_spec_accepts_flower_simulation_config() -> None:
    spec = node_spec({"partition-id": 2, "num-partitions": 4}, 4)
    assert spec.partition_id == 2 and spec.data_path is None and spec.device is None


def test_import_client_app_is_light() -> None:
    code = "import sys, client.app; print(sorted(m for m in ('torch', 'fedbayes', 'numpy') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch" not in res.stdout and "fedbayes" not in res.stdout, res.stdout


# ------------------------------------------------------------------------------------------ run config
def test_pyproject_run_config_lists_every_key() -> None:
    """Flower rejects `-c` keys absent from pyproject, so every run key, every algorithm's hyperparameter and the
    Flower-only keys must be there; all unset ("": the preset's value) except preset = "auto", algorithm and
    num-clients and rounds (sized for the demo)."""
    want = pyproject_run_config()
    assert set(want) == set(app_run_config())
    assert {k: v for k, v in want.items() if v != ""} == {
        "preset": "auto", "algorithm": "bayes-admm", **DEMO_DEFAULTS,
        **{k: v for k, v in FLOWER_KEYS.items() if v != ""}}
    hint = "regenerate [tool.flwr.app.config] with `python -m fedbayes.runconfig`"
    assert set(PYPROJECT_CFG) == set(want), (hint, set(PYPROJECT_CFG) ^ set(want))
    assert {k for k in want if PYPROJECT_CFG[k] != want[k]} == set(), hint
    assert pyproject_section() in (ROOT / "pyproject.toml").read_text(), hint
    flat, opts = split_run_config(PYPROJECT_CFG)
    assert resolve(flat).run.num_clients == PYPROJECT_CFG["num-clients"]
    assert str(opts.out_dir) == "runs/flower"


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "feddyn", "fedlap-cov", "bayes-admm"])
def test_run_config_round_trip(algorithm: str, tmp_path: Path) -> None:
    flat = {**FLAT, "algorithm": algorithm, "lr": 0.05, "antithetic": True, "hidden": "16,8",
            "exclude-clients": "1,3", "round-timeout": 30.0}
    if algorithm == "bayes-admm":
        flat["server-step"] = 0.3
    rc = run_config(flat, **{"out-dir": str(tmp_path)})
    got, opts = split_run_config(rc)
    assert resolve(got).to_flat() == resolve(flat).to_flat()
    assert opts.out_dir == tmp_path
    text = overrides_toml(run_config_overrides(flat))
    parsed = tomllib.loads(text)
    assert parsed[algorithm]  # the algorithm's table, as `flwr run -c FILE.toml` reads it


def test_restarted_node_takes_over_its_partition() -> None:
    """A second node claiming a held partition is refused while the holder is online, and takes the partition
    over once the holder is gone (a SuperNode restarted with a new Flower node id)."""
    from server.strategy import FedBayesStrategy

    flat = {**FLAT, "num-clients": 2, "rounds": 1}
    strat = FedBayesStrategy(Federation.build(resolve(flat)))
    grid = LoopbackGrid({1: {"partition-id": 0}, 2: {"partition-id": 1}, 3: {"partition-id": 0}}, run_config(flat))
    strat.bind_nodes(grid, 0.0)  # type: ignore[arg-type]
    assert strat.node_of == {0: 1, 1: 2}
    del grid.contexts[1]
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert strat.node_of == {0: 3, 1: 2}
    assert sorted(m.metadata.dst_node_id for m in msgs) == [2, 3]


def test_gpu_check_without_gpu_says_why(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: `make gpu-check` runs the real check")
    from simulations.gpu_check import main

    assert main(["--out", str(tmp_path)]) == 2
    assert "gpu-check needs a CUDA GPU" in capsys.readouterr().err
