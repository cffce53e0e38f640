"""The command line: errors before training, run/compare outputs, presets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedbayes.cli import main
from fedbayes.presets import load_preset, preset_names


def test_algorithms_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in ("fedavg", "fedprox", "fedadmm", "feddyn", "fedlap", "fedlap-cov", "pvi", "bayes-admm"):
        assert name in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["run", "--algorithm", "fedsgd"], "unknown algorithm 'fedsgd'"),
        (["run", "--dataset", "cifar10"], "unknown dataset 'cifar10'"),
        (["run", "--model", "resnet"], "unknown model 'resnet'"),
        (["run", "--set", "rhoo=1"], "unknown config key for algorithm 'bayes-admm': 'rhoo' (did you mean 'rho'"),
        (["run", "--set", "lr=-1"], "lr: Input should be greater than 0"),
        (["run", "--set", "epochs=two"], "epochs"),
        (["run", "--algorithm", "pvi", "--set", "rho=2"], "rho"),
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--set", "novalue"], "key=value"),
    ],
)
def test_bad_input_fails_before_training(argv: list[str], needle: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_every_preset_loads_and_validates() -> None:
    assert {"demo", "fmnist-10-iid", "fmnist-10-het", "fmnist-100-het", "mnist-100-2class", "adult-10-het",
            "digits-10-het"} <= set(preset_names())
    for name in preset_names():
        p = load_preset(name)
        assert p.algorithms and p.description


def test_preset_with_typo_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[base]\ndataset = "digits"\n[algorithms.fedprox]\nmuu = 0.1\n')
    with pytest.raises(ValueError, match=r"\[algorithms.fedprox\].*muu"):
        load_preset(str(bad))


def test_run_writes_results_and_config_reproduces(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["run", "--algorithm", "fedavg", "--dataset", "digits", "--clients", "3", "--rounds", "2",
            "--set", "hidden=16", "--set", "epochs=1", "--quiet"]
    assert main([*args, "--out", str(a)]) == 0
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["algorithm"] == "fedavg" and cfg["num-clients"] == 3
    assert main(["run", "--config", str(a / "config.json"), "--out", str(b), "--quiet"]) == 0
    assert (a / "posterior.safetensors").read_bytes() == (b / "posterior.safetensors").read_bytes()


def test_compare_writes_table_and_plots(tmp_path: Path) -> None:
    preset = tmp_path / "tiny.toml"
    preset.write_text(
        'description = "tiny"\n[base]\ndataset = "digits"\nnum-clients = 3\nrounds = 3\nhidden = "16"\n'
        'epochs = 1\nbma-samples = 4\n[algorithms.fedavg]\nlr = 0.01\n[algorithms.pvi]\nlr = 0.1\n'
    )
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", str(preset), "--seeds", "0,1", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["algorithm"] for r in rows] == ["fedavg", "pvi", "centralized", "centralized-ivon"]
    for r in rows:
        assert float(r["test_accuracy_mean"]) > 0.3 and float(r["test_accuracy_std"]) >= 0.0  # chance: 0.1
        assert r["seeds"] == "2"
    assert rows[1]["bma_test_nll_mean"] != ""
    # the reported prediction: the posterior average where there is one, else the mean
    assert [r["prediction"] for r in rows] == ["mean", "posterior average", "mean", "posterior average"]
    assert rows[1]["reported_test_nll_mean"] == rows[1]["bma_test_nll_mean"]
    assert rows[0]["reported_test_nll_mean"] == rows[0]["test_nll_mean"]
    # a rule whose preset says reported-prediction = "mean" is reported at its mean (runs reused, nothing retrained)
    from simulations.compare import aggregate_runs

    folders = {"pvi": [out / "pvi" / "seed-0", out / "pvi" / "seed-1"]}
    [pvi] = aggregate_runs(folders, {"pvi": "mean"})
    assert pvi["prediction"] == "mean" and pvi["reported_test_nll_mean"] == pvi["test_nll_mean"]
    for png in ("accuracy.png", "nll.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fedavg |" in (out / "table.md").read_text()
    # the table is the mean over seeds of the last-3-round average
    m = [json.loads(x) for x in (out / "fedavg" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (out / "fedavg" / "seed-1" / "metrics.jsonl").read_text().splitlines()]
    expect = (sum(r["test_accuracy"] for r in m[-3:]) / 3 + sum(r["test_accuracy"] for r in m1[-3:]) / 3) / 2
    assert float(rows[0]["test_accuracy_mean"]) == pytest.approx(expect)


def test_compare_has_a_centralized_ivon_row(tmp_path: Path) -> None:
    """centralized-ivon: one-client PVI (rho = 1, IVON with the pvi table's settings) on the pooled data, with
    its posterior average, in table.md/csv."""
    preset = tmp_path / "tiny.toml"
    preset.write_text(
        'description = "tiny"\n[base]\ndataset = "digits"\nnum-clients = 3\nrounds = 1\nhidden = "8"\n'
        'epochs = 1\nbma-samples = 2\n[algorithms.fedavg]\nlr = 0.01\n'
        '[algorithms.pvi]\nlr = 0.05\ntemperature = 0.1\nrho = 0.3\n'
    )
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", str(preset), "--algorithms", "fedavg", "--out", str(out), "--quiet"]) == 0
    rows = {r["algorithm"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert list(rows) == ["fedavg", "centralized", "centralized-ivon"]
    assert rows["centralized-ivon"]["bma_test_nll_mean"] != "" and rows["centralized"]["bma_test_nll_mean"] == ""
    assert "| centralized-ivon |" in (out / "table.md").read_text()
    cfg = json.loads((out / "centralized-ivon" / "seed-0" / "config.json").read_text())
    assert (cfg["algorithm"], cfg["rho"], cfg["mode"], cfg["num-clients"], cfg["pool-clients"]) == (
        "pvi", 1.0, "ivon", 1, 3)
    assert (cfg["lr"], cfg["temperature"]) == (0.05, 0.1)
