"""``fedbayes bench engine``: where a local step's time goes, sequential vs batched clients, side by side.

Two parts, one process, one torch thread (``--threads``), results in ``OUT/bench-engine.json``:

* **step** — the papers' MLP 784-200-100-10, batch 64, Fashion-MNIST clients of 640 examples and 10 epochs
  (as fmnist-100-het).  Measured in interleaved blocks (machine noise hits every quantity alike), medians:

  - ``fb``: forward + backward of one minibatch (sequential: the model; batched: the stacked network of 16
    clients, per client);
  - ``noise``: one IVON draw, ``torch.randn`` of P values from a client's generator;
  - ``optimiser``: a whole optimiser step (IVON: sample, ĥ, update; Adam) minus ``fb`` and ``noise``;
  - ``engine``: a client's step inside the trainer (:func:`fedbayes.local.train_local` /
    :func:`fedbayes.batched.train_batched`: batching, prior set-up, the site, bookkeeping) minus the three
    above; reported as a fraction of the local compute (fb + noise + optimiser).

  And ``ivon_over_adam``: a whole IVON step (sample + fb + update) over a whole Adam step.
* **run** — ``--rounds`` rounds of ``fmnist-100-het`` (full Fashion-MNIST, 100 clients, 10 epochs, batch 64) per
  rule in ``--algorithms``, sequential and batched engine one after the other in the same process; the ratio
  sequential wall / batched wall (> 1: batched is faster).  ``--skip-run`` leaves it out (~3 min per rule).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["main", "step_breakdown"]


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _clients(c: int, n: int, mode: str) -> tuple[nn.Module, list[tuple[Any, ...]]]:
    from fedbayes.data import load_dataset
    from fedbayes.gaussian import DiagGaussian
    from fedbayes.local import LocalSettings
    from fedbayes.models import build_model

    data = load_dataset("fmnist")
    x = torch.from_numpy(data.x_train[: c * n])
    y = torch.from_numpy(data.y_train[: c * n]).long()
    model = build_model("mlp", 784, 10, seed=0, hidden=(200, 100))
    named = {k: v.detach().clone() for k, v in model.named_parameters()}
    # IVON under a proper prior (bayes-admm's, pvi's); Adam under a flat one (FedAvg's), so that its "engine" share
    # is the trainer's own and not a proximal term's forward and backward
    prec = 0.1 if mode == "ivon" else 0.0
    prior = DiagGaussian.from_mean_prec({k: v.double() for k, v in named.items()},
                                        {k: torch.full(v.shape, prec, dtype=torch.float64) for k, v in named.items()})
    specs = []
    for i in range(c):
        s = LocalSettings.model_validate({"mode": mode, "epochs": 10, "batch_size": 64, "lr": 1e-3, "seed": i,
                                          "signed_site": True, "hess_init": 0.1})
        specs.append((prior, x[i * n : (i + 1) * n], y[i * n : (i + 1) * n], s, named, None))
    return model, specs


def _mode_breakdown(mode: str, c: int, n: int, blocks: int) -> dict[str, Any]:
    """:func:`step_breakdown` for one optimiser (``ivon`` or ``adam``)."""
    from fedbayes.batched import stacked_forward, train_batched
    from fedbayes.ivon import IVON
    from fedbayes.local import train_local
    from fedbayes.optim import Adam

    model, specs = _clients(c, n, mode)
    x, y = specs[0][1][:64], specs[0][2][:64]
    P = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    loss_fn = nn.functional.cross_entropy

    def fb() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    if mode == "ivon":
        opt: Any = IVON(list(model.parameters()), lr=0.1, ess=6000.0, hess_init=0.1, weight_decay=1e-4,
                        generator=torch.Generator().manual_seed(1))

        def whole() -> None:
            with opt.sampled_params(train=True):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
            opt.step()
    else:
        opt = Adam(list(model.parameters()), lr=1e-3)

        def whole() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    stacked = {k: v.detach().unsqueeze(0).repeat(c, *[1] * v.dim()).clone() for k, v in model.named_parameters()}
    fwd = stacked_forward(model)
    xb, yb = x.unsqueeze(0).repeat(c, 1, 1), y.unsqueeze(0).repeat(c, 1)

    def fb_batched() -> None:
        leaves = {k: v.detach().requires_grad_(True) for k, v in stacked.items()}
        o = fwd(leaves, xb)
        loss = loss_fn(o.reshape(-1, o.shape[-1]), yb.reshape(-1), reduction="none").view(c, -1).mean(1).sum()
        torch.autograd.grad(loss, list(leaves.values()))

    def noise() -> None:
        torch.randn(P, generator=gen)

    seq_steps = sum(int(s[3].epochs) * -(-len(s[1]) // 64) for s in specs[:4])

    def seq_train() -> None:
        for p, xx, yy, s, sm, sp in specs[:4]:
            train_local(model, p, xx, yy, s, start_mean=sm, start_prec=sp)

    bat_steps = sum(int(s[3].epochs) * -(-len(s[1]) // 64) for s in specs)

    def bat_train() -> None:
        train_batched(model, specs)

    for f in (fb, whole, fb_batched, noise):  # warm-up
        f()
    acc: dict[str, list[float]] = {k: [] for k in ("fb", "whole", "fb_batched", "noise", "seq", "bat")}
    for _ in range(blocks):
        acc["fb"].append(_median_ms(fb, 20))
        acc["whole"].append(_median_ms(whole, 20))
        acc["fb_batched"].append(_median_ms(fb_batched, 5) / c)
        acc["noise"].append(_median_ms(noise, 20))
        acc["seq"].append(_median_ms(seq_train, 1) / seq_steps)
        acc["bat"].append(_median_ms(bat_train, 1) / bat_steps)
    med = {k: statistics.median(v) for k, v in acc.items()}
    noise_ms = med["noise"] if mode == "ivon" else 0.0
    opt_ms = med["whole"] - med["fb"] - noise_ms
    local_seq = med["fb"] + noise_ms + opt_ms
    res: dict[str, Any] = {
        "sequential": {"fb_ms": med["fb"], "noise_ms": noise_ms, "optimiser_ms": opt_ms,
                       "engine_ms": med["seq"] - local_seq, "step_in_trainer_ms": med["seq"],
                       "engine_fraction": (med["seq"] - local_seq) / local_seq},
        "batched": {"clients": c, "fb_ms": med["fb_batched"], "noise_ms": noise_ms,
                    "optimiser_and_engine_ms": med["bat"] - med["fb_batched"] - noise_ms,
                    "step_in_trainer_ms": med["bat"],
                    "over_sequential_local_compute": med["bat"] / local_seq - 1.0,
                    "note": "the batched optimiser runs inside the trainer on (clients, P) buffers, so its "
                            "optimiser and engine shares are reported together"},
        "whole_step_ms": med["whole"], "params": P,
    }
    return res


def step_breakdown(c: int = 16, n: int = 640, blocks: int = 5) -> dict[str, Any]:
    """The per-step breakdown (ms per client-step) for the sequential and batched trainers, IVON and Adam."""
    out: dict[str, Any] = {mode: _mode_breakdown(mode, c, n, blocks) for mode in ("ivon", "adam")}
    out["ivon_over_adam"] = out["ivon"]["whole_step_ms"] / out["adam"]["whole_step_ms"]
    out["ivon_over_adam_in_trainer"] = (out["ivon"]["sequential"]["step_in_trainer_ms"]
                                       / out["adam"]["sequential"]["step_in_trainer_ms"])
    return out


def run_ratio(algorithms: list[str], rounds: int, clients: int) -> dict[str, Any]:
    """fmnist-100-het for ``rounds`` rounds, sequential then batched, per rule: wall seconds and their ratio."""
    from fedbayes.config import resolve
    from fedbayes.engine import Federation, run_rounds
    from simulations.presets import load_preset

    res: dict[str, Any] = {}
    for alg in algorithms:
        row: dict[str, Any] = {}
        for eng in ("sequential", "batched"):
            flat = load_preset("fmnist-100-het").config_for(alg, {"rounds": rounds, "num-clients": clients,
                                                                 "client-engine": eng, "bma-samples": 0})
            exp = resolve(flat)
            fed = Federation.build(exp)
            t0 = time.perf_counter()
            rows = run_rounds(fed, exp, [], None, evaluate=False)
            row[eng] = {"wall_s": time.perf_counter() - t0, "train_loss": rows[-1]["train_loss"]}
        row["sequential_over_batched"] = row["sequential"]["wall_s"] / row["batched"]["wall_s"]
        res[alg] = row
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbayes bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default="bayes-admm,fedavg")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-run", action="store_true", help="only the per-step breakdown")
    p.add_argument("--out", default="runs/bench/engine")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res: dict[str, Any] = {"bench": "engine", "threads": a.threads, "torch": torch.__version__,
                           "machine": platform.machine(), "step": step_breakdown()}
    print(json.dumps(res["step"], indent=1), flush=True)
    if not a.skip_run:
        res["run"] = run_ratio([s for s in a.algorithms.split(",") if s], a.rounds, a.clients)
        res["run_config"] = {"preset": "fmnist-100-het", "rounds": a.rounds, "clients": a.clients}
        print(json.dumps(res["run"], indent=1), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-engine.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"[bench engine] {out / 'bench-engine.json'}")
    return 0
