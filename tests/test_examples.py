"""The simulation script in examples/ runs at a small size and writes its folders and plot (issue 24 §3)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cnn_fmnist_example_runs_small(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fedbayes.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset("fmnist", train_fraction=0.001)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not cached (fedbayes data fetch fmnist)")
    spec = importlib.util.spec_from_file_location("cnn_fmnist", ROOT / "examples" / "cnn_fmnist.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ex"
    results = mod.main(["--clients", "2", "--rounds", "1", "--examples", "200", "--test", "100", "--epochs", "1",
                        "--bma-samples", "2", "--out", str(out)])
    assert set(results) == {"bayes-admm", "fedavg"}
    for name in results:
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["algorithm"] == name and cfg["provenance"]["model"]["parameters"]["conv1.weight"] == [6, 1, 5, 5]
        assert (out / name / "posterior.safetensors").exists() and len(results[name]) == 1
    assert (out / "accuracy.png").stat().st_size > 1000
