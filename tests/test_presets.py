"""Presets: every shipped preset validates, `extends` copies a preset's tables and overrides them key by key,
and the robustness preset uses fmnist-10-het's tuned values unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbayes.config import ConfigError, resolve
from fedbayes.presets import load_preset, preset_names


def test_every_preset_resolves_for_every_algorithm_it_lists() -> None:
    for name in preset_names():
        preset = load_preset(name)
        for algo in preset.algorithms:
            resolve(preset.config_for(algo))


def test_extends_copies_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "child.toml").write_text(
        'extends = "digits-10-het"\n[base]\nnum-clients = 7\n[algorithms.fedprox]\nmu = 0.5\n')
    parent, child = load_preset("digits-10-het"), load_preset(str(tmp_path / "child.toml"))
    assert child.base == {**parent.base, "num-clients": 7}
    assert child.algorithms["fedprox"] == {**parent.algorithms["fedprox"], "mu": 0.5}
    assert {k: v for k, v in child.algorithms.items() if k != "fedprox"} == {
        k: v for k, v in parent.algorithms.items() if k != "fedprox"}


def test_extends_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(f'extends = "{tmp_path / "b.toml"}"\n')
    (tmp_path / "b.toml").write_text(f'extends = "{tmp_path / "a.toml"}"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_preset(str(tmp_path / "a.toml"))
    (tmp_path / "c.toml").write_text('extends = "no-such-preset"\n')
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'"):
        load_preset(str(tmp_path / "c.toml"))


def test_robustness_preset_keeps_the_tuned_values() -> None:
    tuned, hard = load_preset("fmnist-10-het"), load_preset("fmnist-25-hard")
    assert hard.algorithms == tuned.algorithms
    assert hard.base["num-clients"] >= 25 and hard.base["class-alpha"] <= 0.1


def test_include_restricts_and_orders_the_algorithms(tmp_path: Path) -> None:
    (tmp_path / "sub.toml").write_text('extends = "digits-10-het"\ninclude = ["bayes-admm", "fedavg"]\n')
    sub = load_preset(str(tmp_path / "sub.toml"))
    assert list(sub.algorithms) == ["bayes-admm", "fedavg"]
    assert sub.algorithms["fedavg"] == load_preset("digits-10-het").algorithms["fedavg"]
    (tmp_path / "bad.toml").write_text('extends = "digits-10-het"\ninclude = ["fedavg", "nope"]\n')
    with pytest.raises(ConfigError, match=r"'include' names \['nope'\]"):
        load_preset(str(tmp_path / "bad.toml"))


def test_centralized_rows_pick_the_pooled_rows_compare_adds(tmp_path: Path) -> None:
    """``centralized-rows`` (inherited through ``extends``) decides which pooled-data rows the grid holds."""
    from simulations.compare import grid_rows

    def names(preset: str, centralized: bool = True) -> list[str]:
        return [n for n, _ in grid_rows(load_preset(preset), ["fedavg"], [0, 1], centralized=centralized)]

    assert names("digits-10-het") == ["fedavg", "fedavg", "centralized", "centralized", "centralized-ivon",
                                      "centralized-ivon"]
    (tmp_path / "one.toml").write_text('extends = "digits-10-het"\ncentralized-rows = ["centralized-ivon"]\n')
    (tmp_path / "child.toml").write_text(f'extends = "{tmp_path / "one.toml"}"\n')
    (tmp_path / "none.toml").write_text('extends = "digits-10-het"\ncentralized-rows = []\n')
    assert names(str(tmp_path / "child.toml")) == ["fedavg", "fedavg", "centralized-ivon", "centralized-ivon"]
    assert names(str(tmp_path / "none.toml")) == ["fedavg", "fedavg"]
    assert names("digits-10-het", centralized=False) == ["fedavg", "fedavg"]
    assert load_preset("demo").centralized_rows == ("centralized",)
    for bad in ('"centralized"', '["centralised"]', '["centralized", "centralized"]', "[1]"):
        (tmp_path / "bad.toml").write_text(f'extends = "digits-10-het"\ncentralized-rows = {bad}\n')
        with pytest.raises(ConfigError, match="centralized-rows must be a list of distinct names"):
            load_preset(str(tmp_path / "bad.toml"))


def test_search_space_tables_move_a_rules_edges(tmp_path: Path) -> None:
    """``[search-space.A]`` rebounds A's dimensions (inherited through ``extends``); the study's space uses them."""
    from fedbayes.algorithms import REGISTRY
    from fedbayes.algorithms.space import LogUniform
    from simulations.tune.spec import make_spec

    (tmp_path / "wide.toml").write_text(
        'extends = "digits-10-het"\n[search-space.bayes-admm]\nlr = [2e-3, 3e-2]\nrho-k = [1, 4]\n')
    (tmp_path / "child.toml").write_text(f'extends = "{tmp_path / "wide.toml"}"\n')
    for name in ("wide", "child"):
        p = load_preset(str(tmp_path / f"{name}.toml"))
        assert p.search_space == {"bayes-admm": {"lr": LogUniform(2e-3, 3e-2), "rho-k": LogUniform(1.0, 4.0)}}
    spec = make_spec(str(tmp_path / "child.toml"), "bayes-admm", 2, out=tmp_path / "study")
    assert spec.space == {**REGISTRY["bayes-admm"].search_space, "lr": LogUniform(2e-3, 3e-2),
                          "rho-k": LogUniform(1.0, 4.0)}
    assert make_spec("digits-10-het", "bayes-admm", 2, out=tmp_path / "s2").space == REGISTRY["bayes-admm"].search_space
    # a preset's sparse evaluation is for its final runs: trials evaluate every round (the pruner's input)
    (tmp_path / "sparse.toml").write_text('extends = "digits-10-het"\n[base]\neval-every = 20\neval-last = 3\n')
    base = make_spec(str(tmp_path / "sparse.toml"), "fedavg", 2, out=tmp_path / "s3").base
    assert (base["eval-every"], base["eval-last"]) == (1, 0)


@pytest.mark.parametrize("table, match", [
    ("[search-space.nope]\nlr = [1e-3, 1e-2]", "unknown algorithm 'nope'"),
    ("[search-space.fedavg]\nmu = [1e-3, 1e-2]", r"'mu' is not in fedavg's search space; valid: \['lr'\]"),
    ("[search-space.fedavg]\nlr = [1e-2, 1e-3]", r"fedavg\] lr: LogUniform: need finite low < high"),
    ("[search-space.fedavg]\nlr = [0, 1e-3]", r"fedavg\] lr: LogUniform needs low > 0"),
    ("[search-space.fedavg]\nlr = 1e-3", r"fedavg\] lr: log-uniform\[0.0001, 0.01\]: give \[low, high\]"),
    ("[search-space.fedavg]\nlr = ['a', 'b']", "must be numbers"),
    ("[search-space]\nfedavg = 3", r"\[search-space.fedavg\]: must be a table"),
])
def test_search_space_errors_name_the_problem(table: str, match: str, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(f'extends = "digits-10-het"\n{table}\n')
    with pytest.raises(ConfigError, match=match):
        load_preset(str(tmp_path / "bad.toml"))
