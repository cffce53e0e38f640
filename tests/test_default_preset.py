"""A run that names no preset starts from its dataset's default preset, under the keys it sets itself: the same
for ``fedbayes run`` and for Flower's run config (``preset = "auto"``), so both resolve to one flat config."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedbayes.cli import _flat_from_args, build_parser, main
from fedbayes.config import ConfigError, load_config_file, resolve
from fedbayes.presets import DATASET_PRESETS, apply_preset, load_preset
from fedbayes.runconfig import split_run_config
from simulations.flower_engine import project_root

PYPROJECT_CFG: dict[str, Any] = {}
for _k, _v in tomllib.loads((project_root() / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"].items():
    if isinstance(_v, dict):
        PYPROJECT_CFG.update({f"{_k}.{k}": v for k, v in _v.items()})
    else:
        PYPROJECT_CFG[_k] = _v


def _cli_flat(argv: list[str]) -> dict[str, Any]:
    flat, _, _ = _flat_from_args(build_parser().parse_args(["run", *argv]))
    return resolve(flat).to_flat()


def _flower_flat(overrides: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    flat, opts = split_run_config({**PYPROJECT_CFG, **overrides})
    return resolve(flat).to_flat(), opts.preset


def test_every_default_preset_exists_and_is_for_its_dataset() -> None:
    for dataset, name in DATASET_PRESETS.items():
        assert load_preset(name).base["dataset"] == dataset


def test_run_without_preset_uses_the_datasets_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = load_preset("digits-10-het")
    want = preset.config_for("fedavg")
    out = tmp_path / "run"
    argv = ["run", "--algorithm", "fedavg", "--dataset", "digits", "--clients", "2", "--rounds", "1",
            "--set", "epochs=1", "--set", "hidden=8", "--set", "bma-samples=0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "[fedbayes] preset: digits-10-het (the default for dataset digits" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    # the preset's values ...
    assert cfg["lr"] == want["lr"] and cfg["mode"] == want["mode"] and cfg["batch-size"] == want["batch-size"]
    assert cfg["activation"] == want["activation"] and cfg["partition"] == want["partition"]
    # ... under the explicit options and --set
    assert cfg["num-clients"] == 2 and cfg["rounds"] == 1 and cfg["epochs"] == 1 and cfg["hidden"] == [8]
    # --config reproduces the run as it was resolved: no preset is applied again
    again = tmp_path / "again"
    assert main(["run", "--config", str(out / "config.json"), "--out", str(again), "--quiet"]) == 0
    assert "[fedbayes] preset" not in capsys.readouterr().out
    assert load_config_file(again / "config.json") == load_config_file(out / "config.json")  # but the provenance


def test_preset_none_and_datasets_without_a_preset_keep_the_code_defaults() -> None:
    bare = _cli_flat(["--algorithm", "fedavg", "--dataset", "digits", "--preset", "none"])
    assert bare["lr"] is None and bare["epochs"] is None and bare["num-clients"] == 10
    flat, used = apply_preset({"algorithm": "pvi", "dataset": "breast-cancer"})
    assert used is None and flat == {"algorithm": "pvi", "dataset": "breast-cancer"}
    _, line, _ = _flat_from_args(build_parser().parse_args(["run", "--dataset", "breast-cancer"]))
    assert line is not None and "breast-cancer has no default preset" in line
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        apply_preset({}, "nope")
    with pytest.raises(SystemExit):  # the command line refuses it while parsing (with the closest names)
        _cli_flat(["--preset", "nope"])


@pytest.mark.parametrize(("argv", "overrides"), [
    # the pyproject defaults: bayes-admm, 3 clients, 5 rounds, dataset unset (digits) -> digits-10-het
    (["--algorithm", "bayes-admm", "--clients", "3", "--rounds", "5"], {}),
    (["--algorithm", "fedprox", "--dataset", "digits", "--clients", "3", "--rounds", "5", "--set", "lr=0.05",
      "--set", "mu=0.5", "--set", "epochs=2"],
     {"algorithm": "fedprox", "dataset": "digits", "lr": 0.05, "fedprox.mu": 0.5, "epochs": 2}),
    (["--algorithm", "pvi", "--clients", "3", "--rounds", "5", "--preset", "none"], {"algorithm": "pvi", "preset": ""}),
    (["--algorithm", "fedlap-cov", "--preset", "fmnist-10-het", "--clients", "3", "--rounds", "5"],
     {"algorithm": "fedlap-cov", "preset": "fmnist-10-het"}),
    (["--algorithm", "fedavg", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "5"],
     {"algorithm": "fedavg", "dataset": "breast-cancer"}),
])
def test_flower_run_config_resolves_like_the_cli(argv: list[str], overrides: dict[str, Any]) -> None:
    cli = _cli_flat(argv)
    flower, used = _flower_flat(overrides)
    assert flower == cli
    assert used == (overrides.get("preset") or DATASET_PRESETS.get(cli["dataset"])
                    if overrides.get("preset", "auto") != "" else None)


def test_an_explicit_rho_replaces_the_presets_rho_k() -> None:
    """rho and rho-k are one setting (ρ or K·ρ): a user's rho must not clash with the preset's rho-k."""
    assert "rho-k" in load_preset("digits-10-het").algorithms["bayes-admm"]
    cli = _cli_flat(["--algorithm", "bayes-admm", "--clients", "3", "--rounds", "5", "--set", "rho=0.5"])
    assert (cli["rho"], cli["rho-k"]) == (0.5, None)
    flower, _ = _flower_flat({"bayes-admm.rho": 0.5})
    assert flower == cli


def test_pyproject_defaults_learn_with_the_digits_preset() -> None:
    flat, used = _flower_flat({})
    want = load_preset("digits-10-het").config_for("bayes-admm")
    assert used == "digits-10-het"
    assert {k: flat[k] for k in ("lr", "epochs", "temperature", "rho-k")} == {
        k: want[k] for k in ("lr", "epochs", "temperature", "rho-k")}
    assert flat["num-clients"] == PYPROJECT_CFG["num-clients"] == 3 and flat["rounds"] == PYPROJECT_CFG["rounds"]


def test_flower_preset_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"run config 'preset'.*unknown preset 'nope'"):
        split_run_config({**PYPROJECT_CFG, "preset": "nope"})
    with pytest.raises(ConfigError, match="'preset' must be"):
        split_run_config({**PYPROJECT_CFG, "preset": 3})
