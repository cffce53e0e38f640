"""The command line a newcomer expects (issue 23, items 6-8): a fast ``--help`` (no torch), help text and choices on
every option, ``--version``, ``presets`` and ``keys``, "did you mean" for unknown names and keys, errors that name
the file, ``bench ivon --out``, and compare/tune outputs that say what they show."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedbayes.cli import BENCH_NAMES, OWN_OPTIONS, build_parser, main


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# ------------------------------------------------------------------------------------------------ item 8: --help
def test_parser_and_every_help_import_no_torch() -> None:
    """Building the parser and formatting every command's help imports none of torch, flwr, optuna, matplotlib."""
    code = (
        "import sys, argparse\n"
        "from fedbayes.cli import build_parser\n"
        "p = build_parser(); p.format_help()\n"
        "[sub] = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]\n"
        "for c in sub.choices.values(): c.format_help()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'optuna', 'matplotlib'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    help_run = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedbayes", "--help"], capture_output=True,
                              text=True, check=True, timeout=60)
    assert "usage: fedbayes" in help_run.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in help_run.stderr.splitlines() if "|" in line}
    assert "fedbayes" in imported and not imported & {"torch", "flwr", "optuna", "matplotlib"}


def test_choice_lists_equal_the_registries() -> None:
    from fedbayes import names
    from fedbayes.algorithms import REGISTRY
    from fedbayes.data import PARTITIONERS, dataset_names
    from fedbayes.models import model_names
    from simulations.bench import BENCHES
    from simulations.tune.cli import OBJECTIVE_NAMES
    from simulations.tune.spec import OBJECTIVES

    assert list(names.ALGORITHMS) == list(REGISTRY)
    assert list(names.MODELS) == model_names()
    assert list(names.DATASETS) == dataset_names()
    assert list(names.PARTITIONS) == list(PARTITIONERS)
    assert list(OBJECTIVE_NAMES) == sorted(OBJECTIVES)
    assert set(BENCH_NAMES) == set(BENCHES) | set(OWN_OPTIONS)


def test_every_option_has_help_and_closed_sets_have_choices() -> None:
    subs = _subparsers(build_parser())
    assert {"run", "compare", "data", "forget", "merge", "presets", "keys", "bench", "evaluate", "tune"} <= set(subs)
    missing = [f"{name} {a.dest}" for name, sp in subs.items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []
    opts = {a.dest: a for a in subs["run"]._actions}
    assert list(opts["algorithm"].choices) == ["fedavg", "fedprox", "fedadmm", "feddyn", "fedlap", "fedlap-cov",
                                               "pvi", "bayes-admm"]
    assert "digits" in opts["dataset"].choices and "mlp" in opts["model"].choices
    assert list(opts["partition"].choices) == ["iid", "dirichlet", "shards", "paper"]
    assert "fmnist-10-het" in opts["preset"].help  # open set (a name or a TOML path): listed in the help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from fedbayes import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedbayes {__version__}"


def test_presets_lists_name_dataset_description(capsys: pytest.CaptureFixture[str]) -> None:
    from fedbayes.presets import load_preset, preset_names

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    demo = next(line for line in lines if line.split()[0] == "demo")
    assert demo.split()[1] == "fmnist"  # inherited through 'extends = "fmnist-10-het"'
    assert " ".join(load_preset("demo").description.split()) in demo


def test_keys_lists_run_local_and_algorithm_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--algorithm", "fedprox"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert {"num-clients", "rounds", "lr", "epochs", "mu"} <= listed and "rho" not in listed


# ------------------------------------------------------------------------------------------------ did you mean
@pytest.mark.parametrize("argv,needle", [
    (["run", "--algorithm", "bayes-adm"], "unknown algorithm 'bayes-adm'; did you mean 'bayes-admm'?"),
    (["run", "--dataset", "fminst"], "unknown dataset 'fminst'; did you mean 'fmnist'"),
    (["run", "--model", "mpl"], "unknown model 'mpl'; did you mean 'mlp'?"),
    (["run", "--preset", "digits-10-hte"], "unknown preset 'digits-10-hte'; did you mean 'digits-10-het'"),
    (["compare", "--preset", "demo", "--algorithms", "fedavg,fedprx"], "unknown algorithm 'fedprx'; did you mean "
                                                                       "'fedprox'"),
    (["run", "--set", "algorithm=fedprx"], "unknown algorithm 'fedprx'; did you mean 'fedprox'"),
    (["data", "fetch", "digit"], "unknown dataset 'digit'; did you mean 'digits'"),
])
def test_unknown_names_suggest_the_closest(argv: list[str], needle: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out)] if argv[0] != "data" else argv) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unknown_set_key_is_short_with_suggestions(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "--set", "lrr=0.1", "--set", "rho=1", "--algorithm", "fedavg", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'lrr' (did you mean 'lr'" in err
    assert "'rho' (a key of fedadmm, fedlap, fedlap-cov, pvi, bayes-admm, not of fedavg)" in err
    assert "`fedbayes keys --algorithm fedavg`" in err
    assert len(err) < 400  # not the 55 keys on one line


def test_corrupt_metrics_names_file_and_line(tmp_path: Path) -> None:
    from fedbayes.results import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n\n{"round": 2, "test_acc\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON") as err:
        read_metrics(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object"):
        read_metrics(tmp_path)


# ------------------------------------------------------------------------------------------------ item 7
def test_bench_takes_out_after_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The Makefile's ``bench ivon --out runs/bench`` (``--out`` after NAME) works; other options are refused."""
    from simulations import bench

    seen: list[Path] = []
    monkeypatch.setitem(bench.BENCHES, "ivon", lambda out: seen.append(out) or {"ok": 1})
    assert main(["bench", "ivon", "--out", str(tmp_path / "b")]) == 0
    assert main(["bench", "--out", str(tmp_path / "c"), "ivon"]) == 0
    assert seen == [tmp_path / "b", tmp_path / "c"]
    assert main(["bench", "ivon", "--steps", "3"]) == 2
    assert "unrecognized arguments: --steps 3" in capsys.readouterr().err


def test_bench_ivon_reports_the_one_target(tmp_path: Path) -> None:
    from simulations.bench import IVON_TARGET_RATIO, bench_ivon

    res = bench_ivon(tmp_path, steps=1, blocks=1)
    assert res["target_ratio"] == IVON_TARGET_RATIO
    assert res["target_met"] == (res["ratio_median"] <= IVON_TARGET_RATIO)
    assert json.loads((tmp_path / "bench-ivon.json").read_text())["target"] == \
        f"ivon step <= {IVON_TARGET_RATIO}x adam step"


def test_evaluate_validation_without_split_says_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedbayes.engine import run_experiment

    run_experiment({"dataset": "digits", "algorithm": "fedavg", "num-clients": 2, "rounds": 1, "hidden": "8",
                    "epochs": 1}, tmp_path / "x", progress=False)
    assert main(["evaluate", str(tmp_path / "x"), "--split", "validation"]) == 2
    err = capsys.readouterr().err
    assert "has no validation split" in err and "--validation-fraction" in err
    assert "--set validation-fraction=0.1" in err


# ------------------------------------------------------------------------------------------------ item 6
def _fake_run(folder: Path, flat: dict[str, Any], accs: list[float]) -> Path:
    from fedbayes.config import resolve

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(resolve(flat).to_flat()))
    rows = [{"round": i + 1, "test_accuracy": a, "test_nll": 1 - a, "bytes_up": 10, "wall_s": 1.0}
            for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_title_and_plots_come_from_the_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from simulations.compare import summarize

    base = {"dataset": "digits", "num-clients": 4, "partition": "iid", "rounds": 2, "epochs": 3}
    folders = {
        "fedavg": [_fake_run(tmp_path / f"fedavg/seed-{s}", {**base, "algorithm": "fedavg", "seed": s}, [0.5, 0.6])
                   for s in (0, 1)],
        "pvi": [_fake_run(tmp_path / f"pvi/seed-{s}", {**base, "algorithm": "pvi", "epochs": 5, "seed": s},
                          [0.4, 0.7]) for s in (0, 1)],
    }
    seen: dict[str, dict[str, Any]] = {}

    def record(fig: Figure, path: Any, **kw: Any) -> None:
        ax = fig.axes[0]
        seen[Path(path).name] = {"title": ax.get_title(), "ticks": list(ax.get_xticks()),
                                 "legend": [t.get_text() for t in ax.get_legend().get_texts()],
                                 "bands": len(ax.collections)}

    monkeypatch.setattr(Figure, "savefig", record)
    res = summarize(folders, tmp_path, title="tiny: a preset of 20 rounds x 20 local epochs")
    heading = Path(res["md"]).read_text().splitlines()[0]
    assert heading == "# tiny: digits, 4 clients (iid), 2 rounds × 3/5 local epochs, seeds 0,1"
    acc = seen["accuracy.png"]
    assert acc["title"].splitlines() == [heading[2:], "test accuracy: mean ± 1 std over 2 seeds (band)"]
    assert all(float(t).is_integer() for t in acc["ticks"]) and acc["bands"] == 2
    assert acc["legend"] == ["fedavg", "pvi"]
    one = {"fedavg": folders["fedavg"][:1]}
    summarize(one, tmp_path, title="tiny")
    assert seen["nll.png"]["title"].splitlines()[1] == "test NLL: 1 seed (no band)" and seen["nll.png"]["bands"] == 0


def test_tune_curves_have_a_legend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from matplotlib.figure import Figure

    from simulations.tune.outputs import write_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}
    for i, v in enumerate((0.9, 0.5, 0.7)):
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.1 * (i + 1)}, distributions=dist, value=v,
                                                  intermediate_values={1: v + 0.2, 2: v}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"lr": 0.5},
                                              distributions=dist, intermediate_values={1: 2.0}))
    spec = argparse.Namespace(out=tmp_path, metric="val_nll", direction="minimize", study_name="s", space={})
    legends: dict[str, list[str]] = {}

    def record(fig: Figure, path: Any, **kw: Any) -> None:
        leg = fig.axes[0].get_legend()
        legends[Path(path).name] = [t.get_text() for t in leg.get_texts()] if leg else []

    monkeypatch.setattr(Figure, "savefig", record)
    write_plots(study, spec)  # type: ignore[arg-type]
    assert legends["curves.png"] == ["trial 0: 0.9", "trial 1: 0.5 (best)", "trial 2: 0.7", "trial 3 (pruned)"]
