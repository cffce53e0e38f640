"""The reliability note of what-if answers (fedbayes.whatif.reliability): its fields derived by hand from the run's
own files, a warning with a suggestion on a short run, none on a run inside the measured range."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedbayes.engine import run_experiment
from fedbayes.results import load_checkpoint
from fedbayes.whatif import load_run, whatif
from fedbayes.whatif.reliability import (
    MAX_SETTLE,
    MEASURED_REFINE,
    MIN_COVERAGE,
    describe_note,
    merge_note,
    settle,
)
from simulations.whatif_cli import main

TINY = {"dataset": "digits", "algorithm": "bayes-admm", "num-clients": 4, "rounds": 2, "hidden": "16", "epochs": 1,
        "bma-samples": 4, "seed": 0, "damping": 0.01}
# inside the measured range: 10 clients, 10 rounds, settled (a linear model with one full batch per step: about
# 0.7 % per round over the last 3 rounds), duals that hold the data terms (damping 0.5)
INSIDE = {"dataset": "digits", "algorithm": "bayes-admm", "num-clients": 10, "rounds": 10, "model": "logreg",
          "epochs": 20, "batch-size": 512, "lr": 0.3, "damping": 0.5, "bma-samples": 4, "seed": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    out = {"tiny": root / "tiny", "inside": root / "inside"}
    run_experiment(TINY, out["tiny"], progress=False)
    run_experiment(INSIDE, out["inside"], progress=False)
    return out


def _nll(folder: Path) -> list[float]:
    return [json.loads(line)["bma_test_nll"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _prec_sums(folder: Path) -> tuple[float, int, float]:
    """(Σ global precision, number of weights, Σ duals' precision) read straight from the checkpoint."""
    _, state = load_checkpoint(folder)
    glob = [v for k, v in state.items() if k.startswith("server/global.prec/")]
    duals = [v for k, v in state.items() if k.startswith("server/dual_sum.prec/")]
    return (float(sum(float(v.double().sum()) for v in glob)), sum(v.numel() for v in glob),
            float(sum(float(v.double().sum()) for v in duals)))


def test_settle_by_hand() -> None:
    rows: list[dict[str, Any]] = [{"round": r, "test_nll": v} for r, v in enumerate([2.0, 1.0, 0.9, 0.8, 0.75], 1)]
    st = settle(rows)
    assert st is not None and (st["from_round"], st["to_round"], st["metric"]) == (2, 5, "test_nll")
    assert st["relative_per_round"] == pytest.approx((1.0 - 0.75) / 0.75 / 3)
    # the posterior average's NLL first; rounds not evaluated are skipped; one evaluated round says nothing
    rows = [{"round": 2, "bma_test_nll": 1.0, "test_nll": 5.0}, {"round": 3}, {"round": 4, "bma_test_nll": 0.5}]
    st = settle(rows)
    assert st is not None and st["metric"] == "bma_test_nll" and st["relative_per_round"] == pytest.approx(0.5)
    assert settle([{"round": 1, "test_nll": 1.0}]) is None


def test_short_run_warns_with_fields_derived_by_hand(runs: dict[str, Path]) -> None:
    run = load_run(runs["tiny"])
    note = whatif(run, [1], evaluate="none").report["reliability"]
    facts, rem = note["facts"], note["removal"]
    assert (facts["rounds"], facts["clients"]) == (2, 4)
    m1, m2 = _nll(runs["tiny"])
    assert facts["settle"]["relative_per_round"] == pytest.approx(abs(m2 - m1) / m2, rel=1e-12)
    sizes = [len(run.fed.parts[c]) for c in range(4)]
    assert rem["removed_examples_share"] == pytest.approx(sizes[1] / sum(sizes), rel=1e-12)
    glob, numel, duals = _prec_sums(runs["tiny"])
    data = glob - 1.0 * numel  # δ = 1 (the default prior precision)
    assert rem["global_data_precision"] == pytest.approx(data, rel=1e-9)
    assert rem["coverage"] == pytest.approx(duals / data, rel=1e-6)
    own = sum(float(v.double().sum()) for k, v in run.rule.store.get_all(1).items() if k.startswith("dual.prec/"))
    assert rem["removed_precision_share"] == pytest.approx(own / data, rel=1e-6)
    assert rem["coverage"] < MIN_COVERAGE  # two rounds at damping 0.01: the duals hold almost nothing yet
    assert not note["ok"] and any("2 round(s)" in w for w in note["warnings"])
    assert any("4 client(s)" in w for w in note["warnings"])
    assert any("has not settled" in w for w in note["warnings"]) and facts["settle"]["relative_per_round"] > MAX_SETTLE
    assert any("account for" in w for w in note["warnings"])
    assert "--verify" in note["suggest"] and "still learning" in note["suggest"]  # refining would add training


def test_inside_the_measured_range_no_warning(runs: dict[str, Path]) -> None:
    run = load_run(runs["inside"])
    note = whatif(run, [3], evaluate="none").report["reliability"]
    nll = _nll(runs["inside"])
    assert note["facts"]["settle"]["relative_per_round"] == pytest.approx(abs(nll[-1] - nll[-4]) / nll[-1] / 3)
    assert note["ok"] and note["warnings"] == [] and note["suggest"] is None
    assert note["removal"]["coverage"] >= MIN_COVERAGE and note["removal"]["damped_fraction"] == 0.0
    assert describe_note(note)[0].startswith("[fedbayes] reliability: inside the measured range")
    # the same settled run answered with an estimator whose sizes measured badly: a warning, and --refine suggested
    site = whatif(run, [3], estimator="site", evaluate="none").report["reliability"]
    assert not site["ok"] and any("'site'" in w for w in site["warnings"])
    assert site["suggest"].startswith(f"--refine {MEASURED_REFINE}")
    # a refinement from the trained global does not use the contributions: no warning about them
    refined = whatif(run, [3], estimator="site", evaluate="none", refine_rounds=1).report["reliability"]
    assert refined["ok"] and refined["removal"]["applies_to_answer"] is False


def test_cli_prints_and_writes_the_note(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w"
    assert main(["whatif", str(runs["tiny"]), "--remove", "1", "--eval", "none", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    note = json.loads((out / "answer.json").read_text())["reliability"]
    assert all(f"reliability WARNING: {w}" in text for w in note["warnings"]) and note["suggest"] in text
    inf = tmp_path / "inf"
    assert main(["influence", str(runs["tiny"]), "--eval", "subset", "--out", str(inf), "--quiet"]) == 0
    text = capsys.readouterr().out
    info = json.loads((inf / "influence.json").read_text())
    assert not info["reliability"]["ok"] and "2 round(s)" in info["reliability"]["warnings"][0]
    assert sorted(info["reliability"]["clients"]) == ["0", "1", "2", "3"]
    md = (inf / "influence.md").read_text()
    assert "outside what docs/whatif.md measured" in md and info["reliability"]["suggest"] in md
    assert "reliability WARNING" in text
    fg = tmp_path / "f"
    assert main(["forget", str(runs["tiny"]), "--remove", "1", "--out", str(fg)]) == 0
    assert not json.loads((fg / "forget.json").read_text())["reliability"]["ok"]
    assert "reliability WARNING" in capsys.readouterr().out


def test_merge_note_carries_both_runs(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["tiny"]), load_run(runs["inside"])
    note = merge_note(a, b)
    assert note["facts"]["a"]["rounds"] == 2 and note["facts"]["b"]["rounds"] == 10
    assert any(w.startswith("A: the run trained 2") for w in note["warnings"])
    assert not any(w.startswith("B:") for w in note["warnings"])
    assert "not measured on a network" in note["warnings"][-1]
