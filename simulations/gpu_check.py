"""``make gpu-check``: does fedbayes train on this machine's CUDA GPU, in process and under Flower?

1. two rounds of bayes-admm with ``device = "cuda"`` through the in-process engine
   (:func:`fedbayes.engine.run_experiment`);
2. the same experiment through Flower's simulation runtime with a GPU fraction per ClientApp
   (``client-resources-num-gpus``, so several ClientApps share the GPU);
3. sequential vs batched clients (:mod:`fedbayes.batched`) on the papers' workload, fmnist-100-het (100 clients,
   10 epochs, batch 64): clients per second of each over ``--compare-rounds`` rounds, and the wall time and
   test accuracy of the papers' whole run (``--paper-rounds``, 50) with batched clients (``--paper-rounds 0``
   skips it);
4. the same comparison with the built-in ``cnn`` (``--cnn-rounds``, default 1; 0 skips it): clients per second of
   sequential and batched clients and the wall time of one bayes-admm round each, what users of image models run.

It prints the GPU, the wall time of each, and the test accuracy per round, and exits with status 2 and a clear
message when torch sees no CUDA GPU (status 1 when a run fails).

    python -m simulations.gpu_check [--out runs/gpu-check] [--clients 4] [--rounds 2] [--gpu-fraction 0.25]
                                    [--compare-rounds 2] [--paper-rounds 50] [--cnn-rounds 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["engines", "gpu_check", "main"]


def _no_gpu_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    built = torch.version.cuda
    if built is None:
        return (f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
                "(e.g. `pip install torch==<version>` from PyPI on Linux, or the index of your CUDA version)")
    return (f"torch {torch.__version__} (CUDA {built}) finds no usable GPU: check `nvidia-smi`, the driver, "
            "and CUDA_VISIBLE_DEVICES")


def engines(out: Path, *, device: str = "cuda", compare_rounds: int = 2, paper_rounds: int = 50,
            sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sequential vs batched clients on fmnist-100-het (bayes-admm; ``sets`` overrides preset keys): clients per
    second of each over ``compare_rounds`` rounds (no evaluation), then ``paper_rounds`` rounds with batched
    clients and the preset's evaluation (wall time, final test accuracy)."""
    from fedbayes.config import resolve
    from fedbayes.engine import run_experiment, run_rounds
    from fedbayes.federation import Federation
    from fedbayes.presets import load_preset

    def flat(engine: str, rounds: int) -> dict[str, Any]:
        return load_preset("fmnist-100-het").config_for("bayes-admm", {
            "rounds": rounds, "device": device, "client-engine": engine, **(sets or {})})

    res: dict[str, Any] = {}
    for engine in ("sequential", "batched"):
        exp = resolve(flat(engine, compare_rounds))
        fed = Federation.build(exp)
        t0 = time.perf_counter()
        rows = run_rounds(fed, exp, [], None, evaluate=False)
        wall = time.perf_counter() - t0
        trained = sum(len(r["participants"]) for r in rows)
        res[engine] = {"wall_s": wall, "clients_per_s": trained / wall, "train_loss": rows[-1]["train_loss"]}
        print(f"[gpu-check] fmnist-100-het, {engine} clients: {res[engine]['clients_per_s']:.1f} clients/s "
              f"({wall:.1f} s for {compare_rounds} round(s))", flush=True)
    res["batched_over_sequential"] = res["batched"]["clients_per_s"] / res["sequential"]["clients_per_s"]
    if paper_rounds > 0:
        t0 = time.perf_counter()
        rows = run_experiment(flat("batched", paper_rounds), out / "paper-batched", progress=False, overwrite=True)
        wall = time.perf_counter() - t0
        last = rows[-1]
        res["paper_run"] = {"rounds": paper_rounds, "wall_s": wall, "test_accuracy": last.get("test_accuracy"),
                            "bma_test_accuracy": last.get("bma_test_accuracy")}
        print(f"[gpu-check] the papers' run (fmnist-100-het, bayes-admm, {paper_rounds} rounds, batched): "
              f"{wall:.0f} s, test accuracy {last.get('test_accuracy')}", flush=True)
    return res


def gpu_check(out: Path, *, clients: int = 4, rounds: int = 2, gpu_fraction: float = 0.25,
              dataset: str = "digits", compare_rounds: int = 2, paper_rounds: int = 50,
              cnn_rounds: int = 1) -> dict[str, Any]:
    """Run the two checks and return a summary (also written to ``out/gpu-check.json``).

    Raises
    ------
    RuntimeError
        No CUDA GPU (the message says why).
    """
    reason = _no_gpu_reason()
    if reason is not None:
        raise RuntimeError(f"gpu-check needs a CUDA GPU: {reason}")
    import torch

    from fedbayes.engine import run_experiment
    from simulations.flower_engine import run_flower_simulation

    flat = {"algorithm": "bayes-admm", "dataset": dataset, "num-clients": clients, "rounds": rounds,
            "device": "cuda", "seed": 0}
    gpu = torch.cuda.get_device_name(0)
    print(f"[gpu-check] torch {torch.__version__}, CUDA {torch.version.cuda}, GPU 0: {gpu}")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    eng = run_experiment(flat, out / "in-process", progress=False, overwrite=True)
    t_eng = time.perf_counter() - t0
    print(f"[gpu-check] in-process engine, device cuda: {t_eng:.1f} s; "
          + ", ".join(f"round {r['round']} acc {r['test_accuracy']:.4f}" for r in eng))

    t0 = time.perf_counter()
    flw = run_flower_simulation(flat, out / "flower", num_supernodes=clients, num_cpus=1.0, num_gpus=gpu_fraction,
                                echo=False)
    t_flw = time.perf_counter() - t0
    print(f"[gpu-check] Flower simulation, {gpu_fraction:g} GPU per ClientApp: {t_flw:.1f} s; "
          + ", ".join(f"round {r['round']} acc {r['test_accuracy']:.4f}" for r in flw))
    failed = [r["failed"] for r in flw if r["failed"]]
    if failed:
        raise RuntimeError(f"gpu-check: Flower ClientApps failed in some rounds: {failed} (see the run's log)")
    summary = {
        "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "config": flat,
        "in_process": {"wall_s": t_eng, "accuracy": [r["test_accuracy"] for r in eng]},
        "flower": {"wall_s": t_flw, "gpu_fraction": gpu_fraction, "accuracy": [r["test_accuracy"] for r in flw]},
        "max_accuracy_diff": max(abs(a["test_accuracy"] - b["test_accuracy"]) for a, b in zip(eng, flw, strict=True)),
    }
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    if compare_rounds > 0:
        summary["engines"] = engines(out, compare_rounds=compare_rounds, paper_rounds=paper_rounds)
        (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    if cnn_rounds > 0:
        print("[gpu-check] the same with the built-in cnn (Fashion-MNIST as 1x28x28 images):", flush=True)
        summary["cnn"] = engines(out / "cnn", compare_rounds=cnn_rounds, paper_rounds=0, sets={"model": "cnn"})
        (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gpu-fraction", type=float, default=0.25)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--compare-rounds", type=int, default=2,
                   help="rounds of fmnist-100-het per engine, sequential vs batched (0: skip)")
    p.add_argument("--paper-rounds", type=int, default=50, help="the papers' run with batched clients (0: skip)")
    p.add_argument("--cnn-rounds", type=int, default=1,
                   help="rounds of fmnist-100-het with the cnn per engine, sequential vs batched (0: skip)")
    args = p.parse_args(argv)
    try:
        s = gpu_check(args.out, clients=args.clients, rounds=args.rounds, gpu_fraction=args.gpu_fraction,
                      dataset=args.dataset, compare_rounds=args.compare_rounds, paper_rounds=args.paper_rounds,
                      cnn_rounds=args.cnn_rounds)
    except RuntimeError as e:
        print(f"[gpu-check] FAILED: {e}", file=sys.stderr)
        return 2 if "needs a CUDA GPU" in str(e) else 1
    print(f"[gpu-check] OK on {s['gpu']}: in-process {s['in_process']['wall_s']:.1f} s, Flower "
          f"{s['flower']['wall_s']:.1f} s; max accuracy difference {s['max_accuracy_diff']:.2g}; "
          f"summary in {args.out / 'gpu-check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
