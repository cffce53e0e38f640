"""``fedbayes compare --tune N`` (issue 26 §3): tune every rule on validation, choose on validation only, run the
choices on the test set, both objectives' tables; resume after a kill; refusal of a folder made otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedbayes.cli import main
from fedbayes.config import load_config_file
from tests.test_tune import _states, kill_during_second_trial

ROOT = Path(__file__).resolve().parents[1]

TINY = """description = "digits, 2 clients, tiny MLP (test preset)"
[base]
dataset = "digits"
num-clients = 2
partition = "dirichlet"
rounds = 2
epochs = 1
batch-size = 64
model = "mlp"
hidden = "16"
seed = 0

[algorithms.fedavg]
mode = "adam"
lr = 0.005

[algorithms.fedprox]
mode = "adam"
lr = 0.005
mu = 0.001
"""


def _preset(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def _argv(preset: Path, out: Path, trials: int, algorithms: str = "fedavg") -> list[str]:
    return ["compare", "--tune", str(trials), "--preset", str(preset), "--algorithms", algorithms,
            "--no-centralized", "--out", str(out), "--quiet"]


def _study(db: Path) -> Any:
    import optuna

    summaries = optuna.get_all_study_summaries(f"sqlite:///{db}")
    return optuna.load_study(study_name=summaries[0].study_name, storage=f"sqlite:///{db}")


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ choosing the best
def test_choose_reads_both_objectives_from_one_study_within_the_budget(tmp_path: Path) -> None:
    """The accuracy-best and the NLL-best of one study (pruned trials and trials beyond the first N finished ones
    never count; ties go to the lower trial number), derived by hand from the recorded attributes."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from simulations.tune import make_spec
    from simulations.tune.protocol import choose, counted_trials

    spec = make_spec("digits-10-het", "fedavg", 4, rounds=2, out=tmp_path / "s", objective="accuracy")
    study = optuna.create_study(direction="maximize")
    dist = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    rows = [  # (state, val_accuracy, val_nll)
        (TrialState.COMPLETE, 0.80, 0.70),
        (TrialState.COMPLETE, 0.90, 0.60),  # accuracy-best
        (TrialState.PRUNED, None, None),  # pruned: never a best (it would have the best NLL)
        (TrialState.COMPLETE, 0.85, 0.40),  # NLL-best
        (TrialState.FAIL, None, None),  # not finished: not counted
        (TrialState.COMPLETE, 0.99, 0.10),  # the 5th finished trial: beyond the budget of 4
    ]
    for i, (state, acc, nll) in enumerate(rows):
        attrs = {} if acc is None else {"val_accuracy": acc, "val_nll": nll}
        if state == TrialState.PRUNED:
            attrs = {}
        study.add_trial(create_trial(state=state, value=acc if state == TrialState.COMPLETE else None,
                                     params={"lr": 10.0 ** -(i + 1) if i < 4 else 0.05}, distributions=dist,
                                     user_attrs=attrs, intermediate_values={1: 0.01} if acc is None else {}))
    assert [t.number for t in counted_trials(study, 4)] == [0, 1, 2, 3]
    best_acc, best_nll = choose(study, spec, 4, "accuracy"), choose(study, spec, 4, "nll")
    assert best_acc is not None and best_acc.number == 1
    assert best_nll is not None and best_nll.number == 3
    assert choose(study, spec, 6, "nll").number == 5  # type: ignore[union-attr]  # a larger budget counts it
    tie = optuna.create_study(direction="maximize")
    for _ in range(2):
        tie.add_trial(create_trial(value=0.5, params={"lr": 0.01}, distributions=dist,
                                   user_attrs={"val_accuracy": 0.5, "val_nll": 1.0}))
    assert choose(tie, spec, 2, "accuracy").number == 0  # type: ignore[union-attr]
    empty = optuna.create_study(direction="maximize")
    assert choose(empty, spec, 2, "accuracy") is None


def test_pruner_names_match() -> None:
    from simulations.tune.cli import PRUNER_NAMES
    from simulations.tune.spec import PRUNERS

    assert PRUNER_NAMES == PRUNERS


# ------------------------------------------------------------------------------------------ end to end
def test_compare_tune_end_to_end_on_digits(tmp_path: Path) -> None:
    """Both tables exist; each final run holds its study's best values (chosen from the trials' validation
    numbers) and was evaluated on the test set; the trials on validation; protocol.json has the budget."""
    out = tmp_path / "cmp"
    assert main(_argv(_preset(tmp_path), out, 2, "fedavg,fedprox")) == 0
    proto = json.loads((out / "protocol.json").read_text())
    assert proto["status"] == "done" and proto["objectives"] == ["accuracy", "nll"]
    assert proto["budget"]["trials-per-rule"] == 2 and proto["pruner"] == "hyperband"
    assert "pruned" in proto["pruning-rule"] and "accuracy" in proto["pruning-rule"]
    for o in ("accuracy", "nll"):
        md = (out / o / "table.md").read_text()
        assert "| fedavg |" in md and "| fedprox |" in md
        assert (out / o / "table.csv").exists() and (out / o / "accuracy.png").stat().st_size > 0
    combined = (out / "table.md").read_text()
    assert combined.index("Headline: tuned for validation accuracy") < combined.index("tuned for validation NLL")

    for algo in ("fedavg", "fedprox"):
        rec = proto["rules"][algo]
        assert rec["trials"]["finished"] == 2 and rec["trials"]["counted"] == 2 and rec["cpu-seconds"] > 0
        study = _study(out / "tune" / algo / "study.db")
        assert study.user_attrs["objective"] == "accuracy" and study.user_attrs["pruner"] == "hyperband"
        assert study.user_attrs["trial-config"]["eval-split"] == "validation"  # the trials never see the test set
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert complete and all({"val_accuracy", "val_nll"} <= set(t.user_attrs) for t in complete)
        for t in complete:  # the study's value is the accuracy attribute (one study serves both objectives)
            assert t.value == pytest.approx(t.user_attrs["val_accuracy"])
        want = {"accuracy": max(complete, key=lambda t: (t.user_attrs["val_accuracy"], -t.number)),
                "nll": min(complete, key=lambda t: (t.user_attrs["val_nll"], t.number))}
        for o, best in want.items():
            assert proto["rules"][algo]["best"][o]["trial"] == best.number
            [run] = proto["final-runs"][o][algo]
            cfg = load_config_file(Path(run) / "config.json")
            assert cfg["eval-split"] == "test" and cfg["algorithm"] == algo
            for k, v in best.params.items():  # written to 6 significant digits, as every preset value
                assert cfg[k] == pytest.approx(v, rel=1e-5), (algo, o, k)
            rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
            assert "test_accuracy" in rows[-1] and not any(k.startswith("val_") for k in rows[-1])
            if o == "nll" and want["nll"].number == want["accuracy"].number:  # same setting: one run serves both
                assert run == proto["final-runs"]["accuracy"][algo][0]


# ------------------------------------------------------------------------------------------ resume after a kill
# kill_during_second_trial: the first trial runs normally, later ones hang; killed while trial 1 is RUNNING.


def test_compare_tune_resumes_after_a_kill(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    db = out / "tune" / "fedavg" / "study.db"
    argv = _argv(_preset(tmp_path), out, 2)
    kill_during_second_trial(argv, db)
    first = _study(db).trials[0]
    assert not (out / "protocol.json").exists()

    assert main(argv) == 0  # the same command continues
    states = _states(db)
    assert states[0] == "COMPLETE" and states[1] == "FAIL" and len(states) == 3  # one new trial, nothing duplicated
    assert states[2] in ("COMPLETE", "PRUNED")
    again = _study(db).trials[0]
    assert (again.params, again.value, again.user_attrs) == (first.params, first.value, first.user_attrs)
    proto = json.loads((out / "protocol.json").read_text())
    assert proto["rules"]["fedavg"]["trials"]["finished"] == 2 and proto["rules"]["fedavg"]["trials"]["fail"] == 1

    before = _files(out / "accuracy" / "fedavg")
    assert main(argv) == 0  # done already: no trial, no run
    assert len(_states(db)) == 3
    assert _files(out / "accuracy" / "fedavg") == before  # the finished final run is reused as it is


# ------------------------------------------------------------------------------------------ refusal
def test_compare_tune_refuses_a_folder_made_with_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    preset = _preset(tmp_path)
    argv = _argv(preset, out, 1)
    assert main(argv) == 0
    snapshot = _files(out)
    raw = (out / "tune" / "fedavg" / "study.db").read_bytes()
    capsys.readouterr()
    for extra, needles in ((["--objective", "nll"], ["objective", "'accuracy'", "'nll'"]),
                           (["--pruner", "median"], ["pruner", "'hyperband'", "'median'"]),
                           (["--set", "epochs=2"], ["trial-config", "'epochs'"]),
                           (["--rounds", "3"], ["rounds"])):
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert all(n in err for n in needles), (extra, err)
        assert "nothing was changed" in err
    assert (out / "tune" / "fedavg" / "study.db").read_bytes() == raw
    assert _files(out) == snapshot  # not a file added or touched

    assert main(["compare", "--preset", str(preset), "--objective", "nll", "--out", str(tmp_path / "x")]) == 2
    assert "--tune" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main([*_argv(preset, tmp_path / "y", 0)]) == 2
    assert "--tune N must be >= 1" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_tune_rounds_sets_the_trials_rounds_not_the_final_runs(tmp_path: Path) -> None:
    """``--tune-rounds 1``: every trial runs 1 round (the study records it), the final runs the preset's 2."""
    out = tmp_path / "cmp"
    assert main([*_argv(_preset(tmp_path), out, 2), "--tune-rounds", "1"]) == 0
    proto = json.loads((out / "protocol.json").read_text())
    assert proto["budget"]["rounds-per-trial"] == 1 and proto["budget"]["final-rounds"] == 2
    study = _study(out / "tune" / "fedavg" / "study.db")
    assert study.user_attrs["rounds"] == 1
    assert all(t.last_step == 1 for t in study.trials if t.state.name == "COMPLETE")
    [run] = proto["final-runs"]["accuracy"]["fedavg"]
    assert load_config_file(Path(run) / "config.json")["rounds"] == 2
    assert "final runs of 2 rounds" in (out / "table.md").read_text()
    assert main([*_argv(_preset(tmp_path), out, 2), "--tune-rounds", "2"]) == 2  # the study was made with 1


def test_tune_rounds_needs_tune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--preset", str(_preset(tmp_path)), "--tune-rounds", "3", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--tune-rounds" in capsys.readouterr().err and not (tmp_path / "x").exists()
