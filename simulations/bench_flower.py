"""``fedbayes bench flower``: what running through Flower costs compared with the in-process engine.

One workload (bayes-admm, digits, a small MLP, iid partition, a few rounds) through

* the in-process engine (:func:`fedbayes.engine.run_experiment`, one torch thread, clients one after the
  other, then batched: ``client-engine = batched``) and Flower's simulation runtime
  (:func:`simulations.flower_engine.run_flower_simulation`, one CPU and so one thread per ClientApp, as many
  ClientApps at once as there are cores) with 10 and 100 clients: end-to-end wall-time ratios, Flower's start-up
  cost (SuperLink, Ray, actors, node query), and per round
  (median over the rounds without cold start or evaluation, 2..R-1) Flower's time minus the engine's and
  Flower's time minus its clients' compute spread over its parallel ClientApps;
* a local deployment (flower-superlink + 3 flower-supernode processes on 127.0.0.1, 2 rounds): per-round
  latency against the local-training time inside it (a fresh ClientApp process per message).

Results go to ``out_dir/bench-flower.json``.  Wall times on a shared machine move with its load, which is
recorded (``loadavg``) with the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["WORKLOAD", "bench_flower"]

WORKLOAD: dict[str, Any] = {
    "algorithm": "bayes-admm", "dataset": "digits", "model": "mlp", "hidden": "32", "partition": "iid",
    "rounds": 5, "epochs": 1, "batch-size": 8, "bma-samples": 0, "seed": 0,
}


def _round_times(rows: Sequence[dict[str, Any]]) -> list[float]:
    walls = [float(r["wall_s"]) for r in rows]
    return [b - a for a, b in zip([0.0, *walls[:-1]], walls, strict=True)]


def _compare(clients: int, work: Path) -> dict[str, Any]:
    import torch

    from fedbayes.engine import run_experiment
    from simulations.flower_engine import run_flower_simulation

    flat = {**WORKLOAD, "num-clients": clients, "eval-every": WORKLOAD["rounds"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        eng = run_experiment(flat, work / f"engine-{clients}", progress=False, overwrite=True)
        t_eng = time.perf_counter() - t0
        t0 = time.perf_counter()
        bat = run_experiment({**flat, "client-engine": "batched"}, work / f"batched-{clients}", progress=False,
                             overwrite=True)
        t_bat = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    flw = run_flower_simulation(flat, work / f"flower-{clients}", num_supernodes=clients, num_cpus=1.0,
                                num_gpus=0.0, echo=False)
    t_flw = time.perf_counter() - t0
    r_eng, r_flw = _round_times(eng), _round_times(flw)
    clean = range(1, len(eng) - 1)  # not round 1 (cold start), not the last (evaluation)
    parallel = max(1, os.cpu_count() or 1)
    steady = [r_flw[i] - r_eng[i] for i in clean]
    beyond_compute = [r_flw[i] - float(flw[i]["train_s"]) / parallel for i in clean]
    return {
        "clients": clients,
        "engine_wall_s": t_eng,
        "flower_wall_s": t_flw,
        "wall_ratio": t_flw / t_eng,
        "batched_engine_wall_s": t_bat,
        "flower_over_batched": t_flw / t_bat,
        "sequential_over_batched": t_eng / t_bat,
        "batched_same_final_accuracy": abs(eng[-1]["test_accuracy"] - bat[-1]["test_accuracy"]) < 1e-3,
        "engine_round_s": r_eng,
        "flower_round_s": r_flw,
        "flower_startup_s": t_flw - float(flw[-1]["wall_s"]),
        "flower_minus_engine_per_round_s": statistics.median(steady),
        "flower_overhead_per_round_s": statistics.median(beyond_compute),
        "flower_overhead_per_client_message_ms": 1e3 * statistics.median(beyond_compute) / clients,
        "engine_local_training_per_round_s": statistics.median(float(eng[i]["train_s"]) for i in clean),
        "flower_client_compute_per_round_s": statistics.median(float(flw[i]["train_s"]) for i in clean),
        "flower_parallel_clientapps": parallel,
        "same_final_accuracy": abs(eng[-1]["test_accuracy"] - flw[-1]["test_accuracy"]) < 1e-9,
    }


def _deployment(work: Path, rounds: int = 2) -> dict[str, Any]:
    from fedbayes.results import read_metrics
    from fedbayes.runconfig import overrides_toml, run_config_overrides
    from simulations.deployment import LocalDeployment
    from simulations.flower_engine import project_root
    from simulations.processes import flwr_run

    out = work / "deployment"
    flat = {**WORKLOAD, "num-clients": 3, "rounds": rounds, "eval-every": rounds}
    rc = work / "deploy-run-config.toml"
    rc.write_text(overrides_toml(run_config_overrides(flat, {"out-dir": str(out), "node-wait-s": 120.0})))
    dep = LocalDeployment(work / "deploy", [f"partition-id={i} num-partitions=3" for i in range(3)])
    with dep:
        t0 = time.perf_counter()
        code = flwr_run(project_root(), dep.connection, dep.env(), work / "deploy-run.log", run_config=rc,
                        timeout_s=600)
        wall = time.perf_counter() - t0
    rows = read_metrics(out)
    if code != 0 or len(rows) != rounds:
        raise RuntimeError(f"deployment benchmark failed (exit {code}, {len(rows)} rounds); see {work}")
    per_round = _round_times(rows)
    train = [float(r["train_s"]) / max(1, len(r["participants"])) for r in rows]
    return {
        "supernodes": 3, "rounds": rounds, "flwr_run_wall_s": wall,
        "startup_and_node_query_s": wall - float(rows[-1]["wall_s"]),
        "round_latency_s": per_round,
        "local_training_per_client_s": train,
        "note": "local training here includes torch's cold start in a fresh ClientApp process; the clients of a "
                "round train in parallel on 2 cores",
    }


def bench_flower(out_dir: Path, clients: Sequence[int] = (10, 100), deployment: bool = True) -> dict[str, Any]:
    """Run the benchmark and write ``out_dir/bench-flower.json``; returns the same dict."""
    import torch

    res: dict[str, Any] = {
        "bench": "flower", "workload": WORKLOAD, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        work = Path(tmp)
        res["simulation"] = [_compare(k, work) for k in clients]
        if deployment:
            res["deployment"] = _deployment(work)
    res["loadavg_end"] = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-flower.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    import sys

    print(json.dumps(bench_flower(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")), indent=1))
