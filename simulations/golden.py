"""Golden runs: prove that a refactoring changed no number.

``python -m simulations.golden save DIR`` runs a fixed set of small experiments and keeps their outputs;
``python -m simulations.golden check DIR`` reruns each from the ``config.json`` it saved and compares.

The set: every registered rule on digits (the ``digits-10-het`` preset's table for the rule, 4 clients, 3 rounds)
in process; one resumed run (bayes-admm stopped after round 2, then resumed to round 3) that must equal the
uninterrupted one; and, with ``--engines inprocess,flower``, the same rules through Flower's simulation runtime.

What must be identical: every tensor of ``posterior.safetensors`` (bit for bit) and every ``metrics.jsonl`` value
except timings (keys ending in ``_s`` or ``seconds``).  ``check`` prints one line per run and exits 1 on any
difference, naming the run, the key and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedbayes.algorithms import REGISTRY
from fedbayes.config import resolve
from fedbayes.engine import run_experiment
from fedbayes.results import read_metrics, read_posterior

__all__ = ["compare_runs", "golden_configs", "main"]

PRESET = "digits-10-het"
SHAPE = {"num-clients": 4, "rounds": 3}
RESUMED = "bayes-admm"


def golden_configs() -> dict[str, dict[str, Any]]:
    """Run name -> resolved flat config (in-process runs; a flower run reuses its rule's config)."""
    from fedbayes.presets import load_preset

    preset = load_preset(PRESET)
    out = {}
    for name in REGISTRY:
        flat = {**preset.config_for(name), **SHAPE, "algorithm": name}
        out[name] = resolve(flat).to_flat()
    return out


def _timing(key: str) -> bool:
    return key.endswith("_s") or key.endswith("seconds")


def compare_runs(a: Path, b: Path) -> list[str]:
    """Differences between two run folders (posterior tensors bit for bit, metrics rows without timings)."""
    problems = []
    pa, pb = read_posterior(a), read_posterior(b)
    if sorted(pa) != sorted(pb):
        problems.append(f"posterior keys differ: {sorted(set(pa) ^ set(pb))[:4]}")
    for k in sorted(set(pa) & set(pb)):
        if pa[k].dtype != pb[k].dtype or pa[k].shape != pb[k].shape or not torch.equal(pa[k], pb[k]):
            diff = (pa[k].double() - pb[k].double()).abs().max().item() if pa[k].shape == pb[k].shape else "shape"
            problems.append(f"posterior '{k}' differs (max |diff| {diff})")
    ra, rb = read_metrics(a), read_metrics(b)
    if len(ra) != len(rb):
        problems.append(f"metrics: {len(ra)} rows vs {len(rb)}")
    for x, y in zip(ra, rb, strict=False):
        kx = {k for k in x if not _timing(k)}
        ky = {k for k in y if not _timing(k)}
        if kx != ky:
            problems.append(f"round {x.get('round')}: metric keys differ: {sorted(kx ^ ky)}")
        for k in sorted(kx & ky):
            if x[k] != y[k]:
                problems.append(f"round {x.get('round')}: '{k}' {x[k]!r} != {y[k]!r}")
    return problems


def _run(flat: Mapping[str, Any], out: Path, engine: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    if engine == "flower":
        from simulations.flower_engine import run_flower_simulation

        run_flower_simulation(dict(flat), out, num_supernodes=int(flat["num-clients"]), echo=False)
    else:
        run_experiment(dict(flat), out, progress=False)


def _run_resumed(flat: Mapping[str, Any], out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    run_experiment(dict(flat), out, progress=False, stop_round=int(flat["rounds"]) - 1)
    run_experiment(dict(flat), out, progress=False, resume=True)


def _jobs(root: Path, engines: Sequence[str], configs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    jobs = [(f"{e}-{name}", e) for e in engines for name in configs]
    return [*jobs, (f"resumed-{RESUMED}", "resumed")]


def save(root: Path, engines: Sequence[str]) -> int:
    configs = golden_configs()
    root.mkdir(parents=True, exist_ok=True)
    for run, engine in _jobs(root, engines, configs):
        flat = configs[run.split("-", 1)[1]]
        (_run_resumed(flat, root / run) if engine == "resumed" else _run(flat, root / run, engine))
        print(f"[golden] saved {run}", flush=True)
    (root / "golden.json").write_text(json.dumps({"engines": list(engines), "preset": PRESET, **SHAPE}, indent=1))
    return 0


def check(root: Path, scratch: Path) -> int:
    meta = json.loads((root / "golden.json").read_text())
    bad = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        run = folder.name
        engine = run.split("-", 1)[0]
        flat = json.loads((folder / "config.json").read_text())
        new = scratch / run
        (_run_resumed(flat, new) if engine == "resumed" else _run(flat, new, engine))
        problems = compare_runs(folder, new)
        if engine == "resumed":  # and the resumed run equals the uninterrupted one
            plain = root / f"inprocess-{RESUMED}"
            if plain.exists():
                problems += [f"resumed vs uninterrupted: {p}" for p in compare_runs(plain, new)]
        print(f"[golden] {run}: {'identical' if not problems else 'DIFFERS'}", flush=True)
        for p in problems[:8]:
            print(f"    {p}", flush=True)
        bad += bool(problems)
    print(f"[golden] {bad} of the saved runs differ (engines {meta['engines']})", flush=True)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.golden", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="run the golden set and keep its outputs in DIR")
    s.add_argument("dir")
    s.add_argument("--engines", default="inprocess", help="comma-separated: inprocess, flower")
    c = sub.add_parser("check", help="rerun every run saved in DIR from its config.json and compare")
    c.add_argument("dir")
    c.add_argument("--scratch", default=None, help="where the reruns go (default DIR-check)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if args.cmd == "save":
        engines = [e for e in args.engines.split(",") if e]
        unknown = sorted(set(engines) - {"inprocess", "flower"})
        if unknown:
            ap.error(f"unknown engine(s) {unknown}; valid: inprocess, flower")
        return save(root, engines)
    if not (root / "golden.json").exists():
        ap.error(f"{root} holds no golden runs (run `save` first)")
    return check(root, Path(args.scratch) if args.scratch else root.with_name(root.name + "-check"))


if __name__ == "__main__":
    sys.exit(main())
