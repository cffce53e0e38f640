"""A study's outputs: ``best.toml``/``best.json``, the plots, and ``tune-apply`` (best values into a preset)."""

from __future__ import annotations

import json
import math
import re
import tomllib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbayes.algorithms import REGISTRY
from fedbayes.algorithms.space import describe_space
from fedbayes.config import ConfigError, resolve
from fedbayes.keys import kebab
from fedbayes.presets import PRESET_DIR, load_preset
from fedbayes.results import atomic_write_bytes

if TYPE_CHECKING:
    import optuna
from simulations.tune.spec import LAST_ROUNDS, TuneSpec


# ------------------------------------------------------------------------------------------------ outputs
def _counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for t in study.get_trials(deepcopy=False):
        key = t.state.name.lower()
        out[key] = out.get(key, 0) + 1
    out["finished"] = out["complete"] + out["pruned"]
    return out



def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        s = f"{v:.6g}"
        return s if any(c in s for c in ".e") else s + ".0"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def toml_table(name: str, table: Mapping[str, Any]) -> str:
    """``[name]`` and its ``key = value`` lines (floats with 6 significant digits)."""
    return f"[{name}]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in table.items())


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def write_best(study: optuna.Study, spec: TuneSpec) -> dict[str, Any] | None:
    """``best.toml`` and ``best.json`` from the study's best complete trial (None if there is none yet)."""
    if not _complete(study):
        return None
    best = study.best_trial
    counts = _counts(study)
    table = {**spec.table, **best.params}
    # values fixed by --set arrive as strings ("1.0"): write them with the types the config gives them
    typed = resolve({**spec.base, **table, "algorithm": spec.algorithm}).to_flat()
    table = {k: typed.get(kebab(k), v) for k, v in table.items()}
    attrs = study.user_attrs
    split = attrs.get("validation-split", {})
    info = {
        "study": spec.study_name, "storage": spec.storage, "preset": spec.preset, "algorithm": spec.algorithm,
        "objective": spec.objective, "predictor": spec.predictor, "metric": spec.metric,
        "direction": spec.direction, "last-rounds": LAST_ROUNDS, "rounds": spec.rounds,
        "trials": {"requested": spec.trials, **counts},
        "best": {"trial": best.number, "value": best.value, "params": best.params},
        "table": table, "search-space": describe_space(spec.space), "sets": spec.sets, "validation-split": split,
    }
    goal = "minimise" if spec.direction == "minimize" else "maximise"
    fixed = sorted(k for k in spec.sets if k in REGISTRY[spec.algorithm].search_space)
    other_sets = {k: v for k, v in spec.sets.items() if k not in fixed}
    head = [
        f"# fedbayes tune: best hyperparameters of {spec.algorithm} on preset {spec.preset}",
        f"# study: {spec.study_name} in {spec.storage}",
        f"# trials: {counts['finished']} finished of {spec.trials} requested ({counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed)",
        f"# budget: {spec.rounds} rounds per trial; validation-fraction {spec.base['validation-fraction']}"
        + (f" ({split.get('num-validation')} {split.get('source')} examples, split {split.get('sha256-16')})"
           if split else ""),
        f"# objective: {goal} {spec.metric}, mean of the last {LAST_ROUNDS} evaluated rounds; best value "
        f"{best.value:.6g} (trial {best.number})",
        f"# tuned: {', '.join(sorted(spec.space))}" + (f"; fixed by --set: {', '.join(fixed)}" if fixed else "")
        + "; every other key as in the preset",
    ]
    if other_sets:
        head.append("# trials also ran with --set " + " ".join(f"{k}={v}" for k, v in other_sets.items())
                    + " (not written below)")
    head.append(f"# apply: fedbayes tune-apply {spec.out} --preset {spec.preset} --out NEW.toml")
    text = "\n".join(head) + "\n" + toml_table(f"algorithms.{spec.algorithm}", table)
    spec.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(spec.out / "best.toml", text.encode())
    atomic_write_bytes(spec.out / "best.json", (json.dumps(info, indent=1, default=str) + "\n").encode())
    return info


LEGEND_TRIALS = 12
"""curves.png names each trial in its legend up to this many trials; beyond, the best trial and the line styles."""


def write_plots(study: optuna.Study, spec: TuneSpec) -> tuple[list[Path], list[str]]:
    """history.png, importance.png (>= 2 complete trials) and curves.png; returns (paths, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    paths: list[Path] = []
    notes: list[str] = []
    complete = _complete(study)

    def save(name: str, fn: Callable[[], Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for its matplotlib plots
            try:
                ax = fn()
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                notes.append(f"{name}: skipped ({e})")
                plt.close("all")
                return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        p = spec.out / name
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

    if complete:
        save("history.png", lambda: ovm.plot_optimization_history(study, target_name=spec.metric))
    else:
        notes.append("history.png: skipped (no complete trial)")
    if len(complete) >= 2 and spec.space:
        save("importance.png", lambda: ovm.plot_param_importances(study, target_name=spec.metric))
    else:
        notes.append(f"importance.png: skipped (needs 2 complete trials, has {len(complete)})")
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if trials:
        fig, ax = plt.subplots(figsize=(8, 5))
        sign = 1.0 if spec.direction == "minimize" else -1.0
        best = min(complete, key=lambda t: sign * float(t.value or 0.0)) if complete else None
        labelled = len(trials) <= LEGEND_TRIALS  # one legend entry per trial; beyond that, the best and the styles
        for t in trials:
            steps = sorted(t.intermediate_values)
            done = t.state == optuna.trial.TrialState.COMPLETE
            is_best = best is not None and t.number == best.number
            label: str | None
            if labelled:
                label = f"trial {t.number}" + (f": {t.value:.4g}" if done and t.value is not None else " (pruned)")
                label += " (best)" if is_best else ""
            else:
                label = f"best: trial {t.number} ({t.value:.4g})" if is_best and t.value is not None else None
            ax.plot(steps, [t.intermediate_values[s] for s in steps], "-" if done else ":",
                    alpha=0.9 if is_best else 0.6, lw=2.2 if is_best else 1, label=label,
                    color="black" if is_best and not labelled else None)
        if not labelled:
            ax.plot([], [], "-", color="grey", lw=1, label="complete trial")
            ax.plot([], [], ":", color="grey", lw=1, label="pruned trial")
        ax.legend(fontsize=7, ncol=2 if labelled and len(trials) > 6 else 1,
                  title=f"objective: mean of the last {LAST_ROUNDS} rounds", title_fontsize=8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(spec.metric)
        ax.set_title(f"{spec.study_name}: {spec.metric} per round (dotted: pruned)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = spec.out / "curves.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths, notes


# ------------------------------------------------------------------------------------------------ tune-apply
def apply_best(dirs: Sequence[str | Path], preset: str, out: str | Path) -> Path:
    """Merge the ``best.toml`` of each study folder (or a best.toml path) into a copy of ``preset``.

    Each best table replaces the preset's table of its algorithm (it is that table with the tuned values
    merged in); the result is validated like any preset.

    Raises
    ------
    ConfigError
        A folder without best.toml, one tuned on another preset, two studies of one algorithm, ``out`` equal to
        the preset's own file, or a result that does not validate (then nothing is left at ``out``).
    """
    src = load_preset(preset)
    src_path = Path(preset) if Path(preset).suffix else PRESET_DIR / f"{preset}.toml"
    target = Path(out)
    if target.suffix != ".toml":
        raise ConfigError(f"--out must be a .toml file, got {target}")
    if target.resolve() == src_path.resolve():
        raise ConfigError(f"--out {target} is the preset itself; write the tuned preset to another file")
    tables: dict[str, dict[str, Any]] = {}
    sources: list[str] = []
    for d in dirs:
        path = Path(d)
        best = path if path.suffix == ".toml" else path / "best.toml"
        if not best.is_file():
            raise ConfigError(f"{d}: no best.toml (has `fedbayes tune` finished a trial there?)")
        meta = best.with_name("best.json")
        if meta.is_file():
            tuned_on = json.loads(meta.read_text()).get("preset")
            if tuned_on is not None and tuned_on != src.name:
                raise ConfigError(f"{d} was tuned on preset '{tuned_on}', not '{src.name}'")
        try:
            data = tomllib.loads(best.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{best}: {e}") from None
        algos = data.get("algorithms", {})
        if set(data) != {"algorithms"} or len(algos) != 1:
            raise ConfigError(f"{best}: expected exactly one [algorithms.NAME] table")
        [(name, table)] = list(algos.items())
        if name in tables:
            raise ConfigError(f"two studies of algorithm '{name}' given ({best}); pass one per algorithm")
        tables[name] = dict(table)
        sources.append(f"{name}: {best}")
    algorithms = {**src.algorithms, **tables}
    lines = [f"# generated by `fedbayes tune-apply` from preset {src.name} with tuned tables of:"]
    lines += [f"#   {s}" for s in sources]
    base_desc = re.sub(r" \(tuned: [^)]*\)$", "", src.description)  # re-tuning a tuned preset: one note, not two
    lines += ["", f"description = {_toml_value(base_desc + ' (tuned: ' + ', '.join(tables) + ')')}", ""]
    lines.append(toml_table("base", src.base))
    for name, table in algorithms.items():
        lines.append(toml_table(f"algorithms.{name}", table))
    if src.centralized:
        lines.append(toml_table("centralized", src.centralized))
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, "\n".join(lines).encode())
    try:
        load_preset(str(target))
    except ConfigError:
        target.unlink(missing_ok=True)
        raise
    return target
