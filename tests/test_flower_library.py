"""fedbayes.flower as a user's Flower app uses it: FedBayes built from a rule name and the app's initial arrays,
the client helper on the app's model and data, in one process (a loopback grid runs each node's train handler).
The same federation through the in-process engine gives the same global posterior, bit for bit."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import DataLoader, TensorDataset

import fedbayes.flower
from fedbayes.config import ConfigError, resolve
from fedbayes.engine import run_experiment
from fedbayes.federation import Federation
from fedbayes.flower import FedBayes
from fedbayes.results import read_metrics, read_posterior

FLAT = {"algorithm": "bayes-admm", "dataset": "digits", "num-clients": 3, "rounds": 2, "model": "logreg",
        "epochs": 1, "seed": 1, "bma-samples": 0}
NODES = [701, 33, 5000]  # client k = k-th smallest node id: 33, 701, 5000


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class UserGrid:
    """A Grid stand-in running a user's ClientApp handlers: train with fedbayes.flower.train on the node's data
    (a DataLoader), evaluate with the arrays FedBayes sends."""

    def __init__(self, fed: Federation, loaders: bool = True) -> None:
        self.fed = fed
        self.data = {n: fed.client_data[k] for k, n in enumerate(sorted(NODES))}
        self.loaders = loaders
        self.evaluated: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def _train(self, msg: Message) -> Message:
        x, y = self.data[msg.metadata.dst_node_id]
        data: Any = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True) if self.loaders else (x, y)
        return Message(fedbayes.flower.train(msg, self.fed.model, data, device="cpu"), reply_to=msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}-{id(msg)}"
            if msg.metadata.message_type == "train":
                try:
                    out.append(self._train(msg))
                except Exception as e:
                    out.append(Message(Error(code=2, reason=str(e)), reply_to=msg))
            else:
                arrays = msg.content["arrays"]
                assert isinstance(arrays, ArrayRecord)
                self.evaluated.append(msg.metadata.dst_node_id)
                n = len(self.data[msg.metadata.dst_node_id][1])
                out.append(Message(RecordDict({"metrics": MetricRecord({"acc": 0.5, "num-examples": n})}),
                                   reply_to=msg))
        return out


def _strategy(out: Path | None = None, **kw: Any) -> FedBayes:
    return FedBayes("bayes-admm", local={"epochs": 1}, seed=1, out=out, **kw)


def _initial(fed: Federation) -> ArrayRecord:
    return ArrayRecord({k: v.detach().clone() for k, v in fed.model.state_dict().items()})


@pytest.mark.parametrize("loaders", [True, False])
def test_user_app_equals_engine(tmp_path: Path, loaders: bool) -> None:
    """FedBayes + fedbayes.flower.train (DataLoader or tensors) = the in-process engine, bit for bit; the app's
    evaluate_fn sees every round and its metrics land in the rows and metrics.jsonl."""
    run_experiment(FLAT, tmp_path / "engine", progress=False)
    fed = Federation.build(resolve(FLAT))
    grid = UserGrid(fed, loaders)
    seen: list[int] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(server_round)
        return MetricRecord({"my-metric": float(server_round)})

    strategy = _strategy(tmp_path / "user", fraction_evaluate=0.5)
    result = strategy.start(grid=grid, initial_arrays=_initial(fed), num_rounds=2,  # type: ignore[arg-type]
                            evaluate_fn=evaluate_fn)
    assert seen == [0, 1, 2]
    want = read_posterior(tmp_path / "engine")
    got = read_posterior(tmp_path / "user")
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    final = result.arrays.to_torch_state_dict()  # the global mean, in the initial arrays' dtypes
    assert list(final) == [k for k, _ in fed.model.named_parameters()]
    assert all(v.dtype == torch.float32 for v in final.values())
    assert all(torch.equal(final[k], v.to(torch.float32)) for k, v in strategy.rule.global_mean().items())
    rows = read_metrics(tmp_path / "user")
    eng = read_metrics(tmp_path / "engine")
    assert [r["my-metric"] for r in rows] == [1.0, 2.0]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in eng]
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in eng]
    assert len(grid.evaluated) == 2 * 2  # ceil(0.5 * 3) nodes per round


def test_resume_continues_the_run(tmp_path: Path) -> None:
    """2 rounds, then resume to 3 = 3 rounds at once (posterior bit for bit)."""
    fed = Federation.build(resolve(FLAT))
    _strategy(tmp_path / "once").start(grid=UserGrid(fed), initial_arrays=_initial(fed),  # type: ignore[arg-type]
                                       num_rounds=3)
    fed = Federation.build(resolve(FLAT))
    _strategy(tmp_path / "twice").start(grid=UserGrid(fed), initial_arrays=_initial(fed),  # type: ignore[arg-type]
                                        num_rounds=2)
    fed = Federation.build(resolve(FLAT))
    s = _strategy(tmp_path / "twice", resume=True)
    s.start(grid=UserGrid(fed), initial_arrays=_initial(fed), num_rounds=3)  # type: ignore[arg-type]
    assert s.start_round == 3 and [r["round"] for r in s.rows] == [1, 2, 3]
    a, b = read_posterior(tmp_path / "once"), read_posterior(tmp_path / "twice")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    fed = Federation.build(resolve(FLAT))
    with pytest.raises(ValueError, match="unknown algorithm"):
        FedBayes("bayes-adm")
    with pytest.raises(ValueError, match="rho"):
        FedBayes("bayes-admm", config={"rho": -1})
    with pytest.raises(ConfigError, match="preset"):
        FedBayes("bayes-admm", preset="no-such-preset")
    with pytest.raises(ValueError, match="unknown local settings"):
        FedBayes("fedavg", local={"learning-rate": 0.1})
    with pytest.raises(ValueError, match="set by the rule or the engine"):
        FedBayes("fedavg", local={"seed": 3})
    with pytest.raises(ValueError, match="set by fedbayes"):
        FedBayes("fedavg").start(grid=UserGrid(fed), initial_arrays=_initial(fed),  # type: ignore[arg-type]
                                 train_config=ConfigRecord({"seed": 1}))
    with pytest.raises(ValueError, match=r"both in local= and in train_config"):
        FedBayes("fedavg", local={"lr": 0.1}).start(grid=UserGrid(fed), initial_arrays=_initial(fed),  # type: ignore[arg-type]
                                                    train_config=ConfigRecord({"lr": 0.2}))
    (tmp_path / "used").mkdir()
    _strategy(tmp_path / "used").start(grid=UserGrid(fed), initial_arrays=_initial(fed),  # type: ignore[arg-type]
                                       num_rounds=1)
    with pytest.raises(ValueError, match="overwrite"):
        _strategy(tmp_path / "used").start(grid=UserGrid(fed), initial_arrays=_initial(fed),  # type: ignore[arg-type]
                                           num_rounds=1)


def test_client_helper_names_a_model_that_does_not_fit() -> None:
    fed = Federation.build(resolve(FLAT))
    strategy = _strategy()
    grid = UserGrid(fed)
    strategy.bind_nodes(grid)  # type: ignore[arg-type]
    strategy._build(_initial(fed), 1)
    msgs = list(strategy.configure_train(1, _initial(fed), ConfigRecord(), grid))  # type: ignore[arg-type]
    x, y = fed.client_data[0]
    with pytest.raises(ValueError, match=r"parameter names differ|shape"):
        fedbayes.flower.train(msgs[0], torch.nn.Linear(3, 2), (x, y), device="cpu")
    sent, want = msgs[0].content["arrays"].to_torch_state_dict(), _initial(fed).to_torch_state_dict()
    assert list(sent) == list(want) and all(torch.equal(sent[k], want[k]) for k in want)  # the global model
    with pytest.raises(ValueError, match=r"epochs"):  # the ClientApp's own epochs, validated as the message's
        fedbayes.flower.train(msgs[0], fed.model, (x, y), 0, device="cpu")
    with pytest.raises(ValueError, match=r"keys="):
        fedbayes.flower.train(msgs[0], fed.model, [{"a": x, "b": y}], device="cpu")


def test_preset_gives_the_rules_tuned_settings_under_the_users() -> None:
    """preset=: the preset's table for the rule, with config=/local= on top (rho replaces the preset's rho-k)."""
    from fedbayes.presets import load_preset

    table = load_preset("fmnist-10-het").algorithms["bayes-admm"]
    s = FedBayes("bayes-admm", preset="fmnist-10-het", config={"rho": 0.5}, local={"lr": 0.01})
    s.num_clients = 2
    flat = s.experiment(3).to_flat()
    assert flat["damping"] == table["damping"] and flat["hess-init"] == table["hess-init"]
    assert flat["temperature"] == table["temperature"] and flat["prior-prec"] == table["prior-prec"]
    assert flat["rho"] == 0.5 and flat["rho-k"] is None and flat["lr"] == 0.01
    assert flat["epochs"] is None and flat["rounds"] == 3  # the preset's base is not used
