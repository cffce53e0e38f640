"""TensorBoard event files (run key ``tensorboard``, :mod:`fedbayes.tensorboard`): written through the results
writer by every engine, read back here with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedbayes.config import ConfigError, load_config_file
from fedbayes.engine import run_experiment
from fedbayes.results import read_metrics

pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install 'fedbayes[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

TINY: dict[str, Any] = {
    "algorithm": "fedavg", "dataset": "digits", "num-clients": 2, "partition": "iid", "rounds": 3, "model": "mlp",
    "hidden": "8", "epochs": 1, "device": "cpu", "seed": 0, "bma-samples": 0, "lr": 0.05,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in row.items()
           if isinstance(v, int | float) and not isinstance(v, bool) and k != "round"}
    out.update({k: float(len(row[k])) for k in ("participants", "failed")})
    return out


def _assert_scalars_match(acc: EventAccumulator, rows: list[dict[str, Any]]) -> None:
    tags = set(acc.Tags()["scalars"])
    want = {k for r in rows for k in _numbers(r)}
    assert want == tags
    for key in want:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        exp = [(int(r["round"]), _numbers(r)[key]) for r in rows if key in _numbers(r)]
        assert [s for s, _ in got] == [s for s, _ in exp], key  # each round once, in order
        # scalars are stored as float32
        np.testing.assert_array_equal(np.float32([v for _, v in got]), np.float32([v for _, v in exp]), err_msg=key)


def test_run_writes_every_metric_per_round_and_the_config_as_hparams(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_experiment({**TINY, "tensorboard": True}, out, progress=False)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    acc = _events(out)
    _assert_scalars_match(acc, rows)
    assert {"test_accuracy", "bytes_up", "bytes_down", "wall_s"} <= set(acc.Tags()["scalars"])
    # the hyperparameters: the resolved config as the HParams plugin's session start, then the session's end
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    assert set(content) == {hp_metadata.SESSION_START_INFO_TAG, hp_metadata.SESSION_END_INFO_TAG}
    ssi = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    config = load_config_file(out / "config.json")  # without its provenance entry: what made the run, not a key
    assert set(ssi.hparams) == set(config)
    assert ssi.hparams["algorithm"].string_value == "fedavg"
    assert ssi.hparams["rounds"].number_value == 3
    assert ssi.hparams["hidden"].string_value == "8"
    assert ssi.hparams["tensorboard"].number_value == 1  # torch writes a bool as a number


def test_key_off_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_experiment({**TINY, "rounds": 1, "tensorboard": False}, out, progress=False)
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_resume_continues_the_log_without_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_experiment(TINY, out, progress=False, stop_round=2)  # "auto": on, the package is installed
    first = sorted((out / "tensorboard").iterdir())
    assert len(first) == 1
    # an interrupted run may have logged a round past its checkpoint: log round 3 in a stray event file
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as w:
        w.add_scalar("test_accuracy", -1.0, 3)
    time.sleep(1.05)  # event files are read in name order, whose first field is the second they were opened in
    run_experiment({"rounds": 3}, out, resume=True, progress=False)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    _assert_scalars_match(_events(out), rows)  # every round once, the resumed one with its own number
    # a fresh run in the same folder replaces the old log with its own
    run_experiment({**TINY, "rounds": 1}, out, progress=False, overwrite=True)
    _assert_scalars_match(_events(out), read_metrics(out))
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_key_true_without_the_package_is_a_config_error_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedbayes.results import ResultsWriter

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError, find_spec -> None
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"fedbayes\[tensorboard\]"):
        ResultsWriter(out, {**TINY, "tensorboard": True})
    assert not out.exists()  # nothing touched
    # "auto" without the package: no log, no error
    ResultsWriter(out, {**TINY, "tensorboard": "auto"}).append_metrics({"round": 1, "test_accuracy": 0.5})
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_bad_value_is_refused_by_the_config() -> None:
    from fedbayes.config import resolve

    with pytest.raises(ConfigError, match="tensorboard"):
        resolve({**TINY, "tensorboard": "sometimes"})


def test_compare_table_is_logged_as_text(tmp_path: Path) -> None:
    from fedbayes.tensorboard import log_table

    log_table(tmp_path, "| a | b |\n|---|---|\n| 1 | 2 |\n")
    log_table(tmp_path, "| a | b |\n|---|---|\n| 3 | 4 |\n")  # a second summary replaces the first
    acc = _events(tmp_path)
    assert acc.Tags()["tensors"] == ["table/text_summary"]
    (ev,) = acc.Tensors("table/text_summary")
    assert b"| 3 | 4 |" in ev.tensor_proto.string_val[0]


def test_compare_logs_its_table_beside_the_runs(tmp_path: Path) -> None:
    from simulations.compare import summarize

    run = tmp_path / "fedavg" / "s0"
    run_experiment({**TINY, "rounds": 1}, run, progress=False)
    summarize({"fedavg": [run]}, tmp_path, title="tiny")
    (ev,) = _events(tmp_path).Tensors("table/text_summary")
    assert ev.tensor_proto.string_val[0].decode() == (tmp_path / "table.md").read_text()
    # without run logs, no table log
    other = tmp_path / "off"
    run_experiment({**TINY, "rounds": 1, "tensorboard": False}, other / "fedavg", progress=False)
    summarize({"fedavg": [other / "fedavg"]}, other)
    assert (other / "table.md").exists() and not (other / "tensorboard").exists()
