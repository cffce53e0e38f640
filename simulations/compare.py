"""``fedbayes compare``: run a preset's grid (algorithms × seeds, plus the pooled-data rows ``centralized``, Adam,
and ``centralized-ivon``, IVON), then write ``table.md``, ``table.csv`` and PNG plots of accuracy and NLL per
round (mean ± std over seeds).

The table reports each metric averaged over the last 3 evaluated rounds (as the papers do), then mean and
standard deviation over seeds.  Its headline columns are the *reported prediction*: the posterior average for the
rules that have one (``bma_*``, :mod:`fedbayes.predictive`'s linearised probit by default) unless the run's
``reported-prediction`` is ``mean``, else the mean.  The
choice was made on validation data (fmnist-10-het, 3,000 unused training images, bayes-admm, 50 rounds, four
settings: the tuned preset of 2026-11, γ = 0.05, γ = 0.05 with lr 1e-3, persistent IVON momentum): the posterior
average had the lower NLL and the lower ECE in all four (e.g. 0.483 / 0.039 against the mean's 0.486 / 0.041);
the mean's numbers stay in the table beside it.

**Reusing a folder** (:func:`plan_cells`).  Each cell's folder is reused only for the same settings: its
``config.json`` (resolved, so keys added since get their defaults) must equal the cell's config but for
:data:`IGNORED` (``reported-prediction`` changes no training; deployment settings) and ``rounds``.

* same settings, finished (last round in ``metrics.jsonl``, ``posterior.safetensors``): reused as it is;
* same settings, unfinished (a checkpoint): continued from the checkpoint (an interrupted comparison continues
  where it stopped; rerun the same command);
* same settings but more rounds asked than the run has: the run is extended from its checkpoint, as
  ``fedbayes run --resume DIR --rounds N`` does (the learning-rate schedule follows the new ``rounds`` from there);
* a ``FAILED.txt`` run, or one with no checkpoint: rerun from round 1;
* other settings (or fewer rounds): **refused** before anything runs, naming each folder and key with the old and
  new values, unless ``force`` (``fedbayes compare --force``), which reruns those cells from round 1 and replaces
  their results.

The table's title and the plots' titles say what the runs *were* — read from each run's resolved ``config.json``
(:func:`run_settings`), never from the preset's description, whose numbers are the preset's defaults (a
``--rounds 2`` run of a "20 rounds" preset is titled "2 rounds").  The plots draw the mean over seeds per round
with a band of ± 1 standard deviation over the seeds, and say so in their title; a row with one seed has no band.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbayes.config import ConfigError, load_config_file, resolve
from fedbayes.noise import share_cores
from fedbayes.presets import Preset, centralized_config, centralized_ivon_config
from fedbayes.results import RunExistsError, holds_run, read_metrics
from fedbayes.resume import MAY_CHANGE

__all__ = [
    "IGNORED", "aggregate_runs", "cell_folder", "grid_rows", "plan_cells", "plot_curves", "reported_predictions",
    "run_cells", "run_grid", "run_settings", "summarize", "write_tables",
]

METRICS = ("test_accuracy", "test_nll", "test_ece", "test_brier")
BMA = tuple(f"bma_{m}" for m in METRICS)
IGNORED = ("reported-prediction", *(k for k in MAY_CHANGE if k != "rounds"))
"""Keys in which a reused run may differ from the cell's config (they change no trained number)."""

Cell = tuple[dict[str, Any], str, bool, str]
"""(flat config, folder, progress, what to do: ``new`` | ``resume`` | ``overwrite``)."""


def _run_one(args: Cell) -> str:
    """Run one grid cell; a run that fails (e.g. local training diverges) is recorded in ``FAILED.txt`` in its
    folder and reported in the table instead of aborting the whole comparison."""
    cfg, out, progress, how = args
    import torch

    from fedbayes.engine import run_experiment

    if os.environ.get("FEDBAYES_THREADS"):
        torch.set_num_threads(int(os.environ["FEDBAYES_THREADS"]))
    (Path(out) / "FAILED.txt").unlink(missing_ok=True)
    try:
        if how == "resume":
            run_experiment({"rounds": resolve(cfg).run.rounds}, out, progress=progress, resume=True)
        else:
            run_experiment(cfg, out, progress=progress, overwrite=how == "overwrite")
    except (FloatingPointError, ValueError, RuntimeError) as e:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "FAILED.txt").write_text(f"{type(e).__name__}: {e}\n")
        return f"{out} FAILED: {type(e).__name__}: {e}"
    return out


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent (which stops them): no traceback from every worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _plan(out: Path, want: dict[str, Any]) -> tuple[str, str]:
    """What to do with cell folder ``out`` for the resolved flat config ``want``: (``done`` | ``new`` |
    ``resume`` | ``overwrite`` | ``differs``, why — for ``differs`` the differing keys with both values)."""
    if (out / "FAILED.txt").exists():
        return "overwrite", "failed before"
    if not holds_run(out):
        return "new", ""
    try:
        have = resolve(load_config_file(out / "config.json")).to_flat()
    except (ConfigError, ValueError) as e:
        return "differs", f"its config.json cannot be read as a config ({e})"
    keys = sorted(k for k in set(want) | set(have) if k not in (*IGNORED, "rounds") and want.get(k) != have.get(k))
    if want["rounds"] < have["rounds"]:
        keys = sorted([*keys, "rounds"])
    if keys:
        return "differs", ", ".join(f"{k}={want.get(k)!r} (folder: {have.get(k)!r})" for k in keys)
    rows = read_metrics(out)
    if rows and rows[-1].get("round") == want["rounds"] and (out / "posterior.safetensors").exists():
        return "done", ""
    if (out / "checkpoint" / "meta.json").exists():
        return "resume", ""
    return "overwrite", "no checkpoint"


def plan_cells(cells: Sequence[tuple[dict[str, Any], Path]], force: bool = False) -> list[tuple[Path, str]]:
    """What to do with each (flat config, folder) cell (see the module docstring); validates every config.

    Raises
    ------
    ConfigError
        A bad config (before anything runs).
    RunExistsError
        Folders hold runs made with other settings and ``force`` is False: every such folder and key is named
        with the old and new values; nothing is touched.
    """
    plans, differ = [], []
    for cfg, out in cells:
        want = resolve(cfg).to_flat()
        how, why = _plan(out, want)
        if how == "differs":
            differ.append(f"  {out}: {why}")
            how = "overwrite"
        plans.append((out, how))
    if differ and not force:
        raise RunExistsError(
            f"{len(differ)} run folder(s) hold runs made with other settings than asked (new value, then the "
            "folder's):\n" + "\n".join(differ) + "\nRerun with --force to rerun those runs from round 1 (their "
            "results are replaced), or use another --out. Nothing was run")
    return plans


POOLED_ROWS: dict[str, Callable[[Preset, int, dict[str, Any] | None], dict[str, Any]]] = {
    "centralized": centralized_config, "centralized-ivon": centralized_ivon_config}
"""The pooled-data rows (:data:`fedbayes.presets.CENTRALIZED_ROWS`) and the flat config of each, per seed."""


def grid_rows(
    preset: Preset,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    sets: dict[str, Any] | None = None,
    centralized: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """The (row name, flat config) of every cell of a preset's grid: each (algorithm, seed), then the pooled-data
    rows ``centralized`` and ``centralized-ivon`` per seed (``centralized``; those of the preset's
    ``centralized-rows``)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for algo in algorithms:
        for s in seeds:
            rows.append((algo, {**preset.config_for(algo, sets), "seed": s}))
    if centralized:  # the preset's centralized-rows (default both)
        for name in preset.centralized_rows:
            rows += [(name, POOLED_ROWS[name](preset, s, sets)) for s in seeds]
    return rows


def cell_folder(out_dir: Path, name: str, cfg: dict[str, Any]) -> Path:
    """A cell's run folder: ``out_dir/NAME/seed-S`` (validates the config)."""
    return out_dir / name / f"seed-{resolve(cfg).run.seed}"


def run_cells(cells: Sequence[tuple[dict[str, Any], Path]], jobs: int = 1, progress: bool = True,
              force: bool = False) -> None:
    """Run every (flat config, folder) cell that :func:`plan_cells` does not find done (reused, continued or
    refused as it says), ``jobs`` at a time (processes, one torch thread each)."""
    todo: list[Cell] = []
    for (cfg, _), (out, how) in zip(cells, plan_cells(cells, force), strict=True):
        if how != "done":
            todo.append((cfg, str(out), progress and jobs == 1, how))
    if jobs > 1 and len(todo) > 1:
        os.environ.setdefault("FEDBAYES_THREADS", "1")
        share_cores(jobs, int(os.environ["FEDBAYES_THREADS"]))  # no spare core: no noise thread (fedbayes.noise)
        ctx = mp.get_context("spawn")
        with ctx.Pool(jobs, initializer=_ignore_sigint) as pool:
            for done in pool.imap_unordered(_run_one, todo):
                print(f"[fedbayes] finished {done}", flush=True)
    else:
        for item in todo:
            _run_one(item)
            print(f"[fedbayes] finished {item[1]}", flush=True)


def run_grid(
    preset: Preset,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    sets: dict[str, Any] | None = None,
    jobs: int = 1,
    centralized: bool = True,
    progress: bool = True,
    force: bool = False,
) -> dict[str, list[Path]]:
    """Run every (algorithm, seed) and the two pooled-data rows, ``centralized`` (FedAvg's local settings: Adam)
    and ``centralized-ivon`` (IVON with the Bayesian rules' settings, with a posterior average;
    :func:`fedbayes.presets.centralized_ivon_config`); returns run folders by row name.  Folders are reused,
    continued or refused as :func:`plan_cells` says (``force``: rerun the cells whose settings differ)."""
    cells: list[tuple[dict[str, Any], Path]] = []
    folders: dict[str, list[Path]] = {}
    for name, cfg in grid_rows(preset, algorithms, seeds, sets, centralized):  # validate everything first
        out = cell_folder(out_dir, name, cfg)
        folders.setdefault(name, []).append(out)
        cells.append((cfg, out))
    run_cells(cells, jobs, progress, force)
    return folders


def _last3(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals[-3:])) if vals else math.nan


def _reported(runs: list[Path]) -> str:
    try:
        return str(resolve(load_config_file(runs[0] / "config.json")).run.reported_prediction)
    except (OSError, ValueError, IndexError):
        return "posterior-average"


def aggregate_runs(folders: dict[str, list[Path]], reported: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One summary row per name: mean/std over seeds of the last-3-rounds average of each metric.

    ``reported``: row name -> ``reported-prediction`` (from the preset; default: the first run's config.json)."""
    table = []
    for name, runs in folders.items():
        failed = [r for r in runs if (r / "FAILED.txt").exists()]
        per_seed = [read_metrics(r) for r in runs if r not in failed]
        row: dict[str, Any] = {"algorithm": name, "seeds": len(per_seed), "failed_runs": len(failed)}
        if not per_seed:
            table.append({**row, "rounds": 0, "mb_up_total": math.nan, "wall_s_mean": math.nan})
            continue
        for key in METRICS + BMA:
            vals = [_last3(rows, key) for rows in per_seed]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                row[f"{key}_mean"] = float(np.mean(vals))
                row[f"{key}_std"] = float(np.std(vals))
        # the reported prediction: the posterior average where the run has one (Bayesian rules) and its config's
        # reported-prediction says so, else the mean
        wants = (reported or {}).get(name) or _reported(runs)
        bma = "bma_test_accuracy_mean" in row and wants == "posterior-average"
        row["prediction"] = "posterior average" if bma else "mean"
        for m in METRICS:
            src = f"bma_{m}" if bma else m
            if f"{src}_mean" in row:
                row[f"reported_{m}_mean"], row[f"reported_{m}_std"] = row[f"{src}_mean"], row[f"{src}_std"]
        ups = [sum(r.get("bytes_up", 0) for r in rows) for rows in per_seed]
        row["rounds"] = per_seed[0][-1]["round"] if per_seed and per_seed[0] else 0
        row["mb_up_total"] = float(np.mean(ups)) / 1e6 if ups else math.nan
        row["wall_s_mean"] = float(np.mean([rows[-1]["wall_s"] for rows in per_seed if rows]))
        table.append(row)
    return table


def write_tables(table: list[dict[str, Any]], out_dir: Path, title: str = "") -> tuple[Path, Path]:
    cols = ["algorithm", "seeds", "rounds", "prediction"]
    for key in tuple(f"reported_{m}" for m in METRICS) + METRICS + BMA:
        if any(f"{key}_mean" in r for r in table):
            cols += [f"{key}_mean", f"{key}_std"]
    cols += ["mb_up_total", "wall_s_mean", "failed_runs"]
    csv_p = out_dir / "table.csv"
    with open(csv_p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in table:
            w.writerow({c: r.get(c, "") for c in cols})
    md_p = out_dir / "table.md"
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += ["Metrics averaged over the last 3 evaluated rounds; mean ± std over seeds (failed runs are counted"
              " in the last column and left out of the means).  accuracy / NLL / ECE are of the reported"
              " prediction: the posterior average for rules that have one (Bayesian rules, centralized-ivon), else"
              " the mean; the mean's own numbers follow.", ""]
    heads = ["algorithm", "prediction", "accuracy", "NLL", "ECE", "mean accuracy", "mean NLL", "mean ECE", "Brier",
             "MB up", "wall s", "failed"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

    def fmt(r: dict[str, Any], key: str, scale: float = 1.0, digits: int = 4) -> str:
        if f"{key}_mean" not in r:
            return "–"
        return f"{r[f'{key}_mean'] * scale:.{digits}f} ± {r[f'{key}_std'] * scale:.{digits}f}"

    for r in table:
        lines.append(
            "| " + " | ".join([
                r["algorithm"], r.get("prediction", "–"), fmt(r, "reported_test_accuracy"),
                fmt(r, "reported_test_nll"), fmt(r, "reported_test_ece"), fmt(r, "test_accuracy"), fmt(r, "test_nll"),
                fmt(r, "test_ece"), fmt(r, "test_brier"),
                f"{r['mb_up_total']:.1f}", f"{r['wall_s_mean']:.0f}", str(r.get("failed_runs", 0)),
            ]) + " |"
        )
    md_p.write_text("\n".join(lines) + "\n")
    return md_p, csv_p


def _values(values: Sequence[Any]) -> str:
    """``[2, 2]`` -> ``"2"``; ``[10, 20, 10]`` -> ``"10/20"`` (the distinct values, in order)."""
    return "/".join(str(v) for v in dict.fromkeys(values))


def run_settings(folders: dict[str, list[Path]]) -> str:
    """What the runs were, from their resolved ``config.json``: dataset, clients and partition, rounds × local
    epochs and seeds of the federated rows (the pooled-data rows ``centralized*`` are one client by construction),
    e.g. ``"digits, 10 clients (dirichlet), 2 rounds × 20 local epochs, seeds 0,1"``.  A setting that differs
    between algorithms shows each value (``"10/20 local epochs"``); "" when no run has a config yet."""
    from fedbayes.config import load_config_file

    exps = []
    for name, runs in folders.items():
        for r in runs:
            if not (r / "config.json").exists():
                continue
            exp = resolve(load_config_file(r / "config.json"))
            exps.append((name, exp))
    fed = [e for n, e in exps if not n.startswith("centralized")] or [e for _, e in exps]
    if not fed:
        return ""
    run = [e.run for e in fed]
    epochs = _values([e.local_setting("epochs") for e in fed])
    return (f"{_values([r.dataset for r in run])}, {_values([r.num_clients for r in run])} clients "
            f"({_values([r.partition for r in run])}), {_values([r.rounds for r in run])} rounds × "
            f"{epochs} local epoch{'' if epochs == '1' else 's'}, "
            f"seeds {','.join(str(s) for s in sorted({r.seed for r in run}))}")


def _heading(title: str, settings: str) -> str:
    """``title``'s name (before ': ', which the preset's description used to follow) with the runs' settings."""
    name = title.split(": ", 1)[0].strip()
    return ": ".join(t for t in (name, settings) if t)


def plot_curves(folders: dict[str, list[Path]], out_dir: Path, title: str = "") -> list[Path]:
    """accuracy.png and nll.png: metric vs round, one line per algorithm: the mean over its seeds with a band of
    ± 1 std over them (no band for one seed), whole-number round ticks, ``title`` above and what the band is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for key, label, fname in (("test_accuracy", "test accuracy", "accuracy.png"), ("test_nll", "test NLL", "nll.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        seeds: list[int] = []
        for name, runs in folders.items():
            curves = []
            for r in runs:
                rows = [x for x in read_metrics(r) if key in x]
                if rows and not (r / "FAILED.txt").exists():
                    curves.append([(x["round"], x[key]) for x in rows])
            if not curves or not curves[0]:
                continue
            n = min(len(c) for c in curves)
            rounds = np.array([c[i][0] for i, c in zip(range(n), [curves[0]] * n, strict=True)])
            vals = np.array([[c[i][1] for i in range(n)] for c in curves])
            mu, sd = vals.mean(0), vals.std(0)
            style = "--" if name.startswith("centralized") else "-"
            seeds.append(len(curves))
            line = ax.plot(rounds, mu, style, label=name)[0]
            if len(curves) > 1:
                ax.fill_between(rounds, mu - sd, mu + sd, alpha=0.2, color=line.get_color())
        if len(set(seeds)) == 1:
            n = seeds[0]
            band = f"mean ± 1 std over {n} seeds (band)" if n > 1 else "1 seed (no band)"
        else:
            band = f"mean ± 1 std over {min(seeds)}–{max(seeds)} seeds (band; none for 1 seed)" if seeds else ""
        ax.set_title("\n".join(t for t in (title, f"{label}: {band}") if t), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def reported_predictions(preset: Preset, names: Sequence[str], sets: dict[str, Any] | None = None) -> dict[str, str]:
    """Each row's ``reported-prediction`` as the preset gives it now (a key that changes no training, so runs
    made before it was set are reused and reported as the preset says)."""
    out = {}
    for name in names:
        cfg = POOLED_ROWS[name](preset, 0, sets) if name in POOLED_ROWS else preset.config_for(name, sets)
        out[name] = str(resolve(cfg).run.reported_prediction)
    return out


def log_table_to_tensorboard(folders: dict[str, list[Path]], md: Path, out_dir: Path) -> Path | None:
    """Add ``table.md`` as text to ``out_dir/tensorboard`` when the runs logged to TensorBoard (any run folder has
    a ``tensorboard/``, run key ``tensorboard``), so ``tensorboard --logdir out_dir`` shows the runs side by side
    with the table; returns that folder, or None when nothing was written."""
    from fedbayes.tensorboard import SUBDIR, available, log_table

    if not available() or not any((Path(f) / SUBDIR).is_dir() for runs in folders.values() for f in runs):
        return None
    return log_table(out_dir, md.read_text())


def summarize(folders: dict[str, list[Path]], out_dir: Path, title: str = "",
              reported: dict[str, str] | None = None) -> dict[str, Any]:
    """table.md, table.csv, summary.json and the plots of a comparison.  ``title``: the preset's name; anything
    after ``": "`` (the preset's description) is dropped: the heading is the name with the runs' own settings
    (:func:`run_settings`)."""
    table = aggregate_runs(folders, reported)
    heading = _heading(title, run_settings(folders))
    md, csv_p = write_tables(table, out_dir, heading)
    log_table_to_tensorboard(folders, md, out_dir)
    plots = plot_curves(folders, out_dir, heading)
    (out_dir / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    return {"table": table, "md": md, "csv": csv_p, "plots": plots}
