"""``fedbayes bench scale``: what a round costs the server as the federation grows (issue: thousands of clients).

For each K in ``--clients`` (default 100, 1,000, 10,000) and each rule in ``--algorithms`` (bayes-admm, fedavg):
Fashion-MNIST split iid over K clients (6 examples each at K = 10,000), the paper's MLP (784-200-100-10), 50
clients per round, ``--rounds`` rounds (5), 1 local epoch, no posterior averaging, ``store = --store`` (disk).
Each configuration runs in its own process (so its peak RSS is its own) and reports per round:

* ``server_s``: the round's wall time minus its clients' training time (configure, encode, decode, aggregate,
  store and checkpoint: the server's bookkeeping), and its median over rounds 1..R−1 (round R also evaluates);
* ``checkpoint_bytes``: the bytes that round's checkpoint wrote (new client files + global state + meta.json),
  against the bound 2 × (participants × per-client state + global);
* ``peak_rss_mb`` of the process.

``--full K`` adds one round of full participation at K clients (bayes-admm, memory measured the same way).
``--pieces`` times each piece of the server's per-client work on its own, for the paper's MLP (P = 178,110):
configure (the prior sent), decode of a site reply, the bayes-admm update of one client, and a disk-store write
(fsynced) and verified read of its state, in float64 and float32; written to ``OUT/pieces.json``.
Results: ``OUT/scale.json`` and a table ``OUT/scale.md``; each configuration is a file under ``OUT/runs`` and is
skipped when present (resumable).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "one"]


def _config(k: int, algorithm: str, rounds: int, per_round: int, store: str, dtype: str) -> dict[str, Any]:
    return {"algorithm": algorithm, "dataset": "fmnist", "train-fraction": 1.0, "num-clients": k, "partition": "iid",
            "rounds": rounds, "epochs": 1, "batch-size": 64, "model": "mlp", "hidden": "200,100",
            "clients-per-round": min(1.0, per_round / k), "bma-samples": 0, "eval-every": rounds, "seed": 0,
            "store": store, "client-state-dtype": dtype, "device": "cpu"}


def one(k: int, algorithm: str, rounds: int, per_round: int, store: str, dtype: str, out: Path) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements."""
    import torch

    from fedbayes.engine import run_experiment

    torch.set_num_threads(1)
    ck = out / "checkpoint"
    seen: set[str] = set()
    per_round_bytes: list[int] = []

    def on_round(row: dict[str, Any]) -> None:
        files = {p.name: p.stat().st_size for p in (ck / "clients").glob("c*.safetensors")}
        new = sum(size for name, size in files.items() if name not in seen)
        seen.clear()
        seen.update(files)
        per_round_bytes.append(new + (ck / "state.safetensors").stat().st_size + (ck / "meta.json").stat().st_size)

    t0 = time.perf_counter()
    rows = run_experiment(_config(k, algorithm, rounds, per_round, store, dtype), out, progress=False, overwrite=True,
                          on_round=on_round)
    wall = time.perf_counter() - t0
    walls = [rows[0]["wall_s"]] + [b["wall_s"] - a["wall_s"] for a, b in itertools.pairwise(rows)]
    server = [w - r["train_s"] for w, r in zip(walls, rows, strict=True)]
    state_mb = 0.0
    client_files = sorted((ck / "clients").glob("c*.safetensors"))
    if client_files:
        state_mb = client_files[0].stat().st_size / 2**20
    glob_mb = (ck / "state.safetensors").stat().st_size / 2**20
    steady = sorted(server[:-1] or server)
    return {
        "clients": k, "algorithm": algorithm, "store": store, "dtype": dtype, "rounds": rounds,
        "participants": [len(r["participants"]) for r in rows],
        "round_wall_s": walls, "train_s": [r["train_s"] for r in rows], "server_s": server,
        "server_s_median": steady[len(steady) // 2],
        "checkpoint_bytes": per_round_bytes,
        "client_state_mb": state_mb, "global_state_mb": glob_mb,
        "checkpoint_bound_bytes": int(2 * (per_round * state_mb + glob_mb) * 2**20),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "test_accuracy": rows[-1].get("test_accuracy"), "wall_s": wall,
    }


def _median_s(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _pieces_of(tdt: Any, dtype: str, tmpl: dict[str, Any], shapes: dict[str, tuple[int, ...]], site: Any,
               out: Path, repeat: int) -> dict[str, Any]:
    import tempfile

    from fedbayes.algorithms.base import ClientUpdate
    from fedbayes.algorithms.bayes_admm import BayesADMM, BayesADMMConfig
    from fedbayes.algorithms.store import ClientFiles, MemoryStore

    res: dict[str, Any] = {}
    rule = BayesADMM(tmpl, 1000, BayesADMMConfig.model_validate({}), store=MemoryStore(tdt))
    rnd = iter(range(2, 10**6))
    ups = [ClientUpdate(c, 10, site=site()) for c in range(repeat)]
    rule.aggregate(1, ups)  # every client heard from once: the timed rounds update existing state
    res[f"configure_s_{dtype}"] = _median_s(lambda: rule.configure(3, 2), repeat)
    batch = ups[:10]
    res[f"update_s_per_client_{dtype}"] = _median_s(lambda: rule.aggregate(next(rnd), batch), 5) / len(batch)
    stored = {k: v.to(tdt) for k, v in rule.store.get_all(3).items()}
    res[f"client_state_bytes_{dtype}"] = sum(v.numel() * v.element_size() for v in stored.values())
    with tempfile.TemporaryDirectory(dir=out) as d:
        files = ClientFiles(d, fingerprint="x" * 64, shapes=shapes)
        clients = iter(range(10**6))
        res[f"disk_write_s_{dtype}"] = _median_s(lambda: files.write(next(clients), stored), repeat)
        res[f"disk_read_s_{dtype}"] = _median_s(lambda: files.read(3), repeat)
    return res


def pieces(out: Path, repeat: int = 20) -> dict[str, Any]:
    """Per-client server costs (median seconds over ``repeat``), each piece alone; see the module docstring."""
    import numpy as np
    import torch

    from fedbayes.gaussian import DiagGaussian
    from fedbayes.models import build_model
    from fedbayes.protocol import decode_reply

    torch.set_num_threads(1)
    model = build_model("mlp", 784, 10, seed=0, hidden=(200, 100), activation="relu")
    tmpl = {k: v.detach() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in tmpl.items()}
    n_params = sum(v.numel() for v in tmpl.values())
    gen = torch.Generator().manual_seed(0)

    def site() -> DiagGaussian:
        return DiagGaussian({k: torch.randn(v.shape, generator=gen) for k, v in tmpl.items()},
                            {k: torch.rand(v.shape, generator=gen) + 1 for k, v in tmpl.items()})

    res: dict[str, Any] = {"parameters": n_params}
    records = {"site.eta": {k: v.numpy() for k, v in site().eta.items()},
               "site.prec": {k: v.numpy() for k, v in site().prec.items()}}
    res["decode_s"] = _median_s(lambda: decode_reply(records, {"num-examples": 10}, client=0, shapes=shapes,
                                                     need_site=True), repeat)
    for dtype in ("float64", "float32"):
        res.update(_pieces_of(getattr(torch, dtype), dtype, tmpl, shapes, site, out, repeat))
    res["numpy"] = np.__version__
    (out / "pieces.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| rule | K | per round | server s/round (median) | round wall s | peak RSS MB | checkpoint MB/round "
             "(bound) | test acc |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ck = max(r["checkpoint_bytes"]) / 2**20
        lines.append(
            f"| {r['algorithm']} | {r['clients']:,} | {max(r['participants'])} | {r['server_s_median']:.2f} | "
            f"{' / '.join(f'{w:.1f}' for w in r['round_wall_s'])} | {r['peak_rss_mb']:.0f} | "
            f"{ck:.0f} ({r['checkpoint_bound_bytes'] / 2**20:.0f}) | {r['test_accuracy'] or float('nan'):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbayes bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="100,1000,10000")
    p.add_argument("--algorithms", default="bayes-admm,fedavg")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--store", default="disk", choices=["memory", "disk"])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--full", type=int, default=0, help="also one round with every one of this many clients")
    p.add_argument("--pieces", action="store_true", help="time each per-client piece alone (OUT/pieces.json)")
    p.add_argument("--out", default="runs/bench/scale")
    p.add_argument("--one", nargs=2, metavar=("K", "RULE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.pieces:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(pieces(out), indent=1))
        return 0
    if a.one:
        k, rule = int(a.one[0]), a.one[1]
        per = a.per_round if a.rounds > 1 or a.full == 0 else k
        res = one(k, rule, a.rounds, per, a.store, a.dtype, out / "runs" / f"{rule}-{k}-{per}-{a.store}-{a.dtype}")
        print(json.dumps(res))
        return 0
    jobs = [(int(k), rule, a.rounds, a.per_round) for k in a.clients.split(",") for rule in a.algorithms.split(",")]
    if a.full:
        jobs.append((a.full, "bayes-admm", 1, a.full))
    results = []
    for k, rule, rounds, per in jobs:
        done = out / "results" / f"{rule}-{k}-{per}-{a.store}-{a.dtype}.json"
        if not done.exists():
            cmd = [sys.executable, "-m", "simulations.bench_scale", "--one", str(k), rule, "--rounds", str(rounds),
                   "--per-round", str(per), "--store", a.store, "--dtype", a.dtype, "--out", str(out)]
            if per == k and rounds == 1:
                cmd += ["--full", str(k)]
            print(f"[scale] {rule} K={k} per-round={per} ...", flush=True)
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(proc.stdout.strip().splitlines()[-1] + "\n")
        results.append(json.loads(done.read_text()))
    (out / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "scale.md").write_text(_table(results))
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
