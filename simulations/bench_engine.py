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

  And ``ivon_over_adam``: a whole IVON step (sample + fb + update) over a whole Adam step, with the noise drawn
  inline, and ``ivon_over_adam_ahead`` with the next step's noise drawn on the worker thread
  (:mod:`fedbayes.noise`, the trainers' default on a CPU); ``*_in_trainer[_inline]`` the same inside the trainer.
  Both optimisers are timed in the same interleaved blocks and each ratio is the median of per-block ratios.
* **run** — ``--rounds`` rounds of ``fmnist-100-het`` (full Fashion-MNIST, 100 clients, 10 epochs, batch 64) per
  rule in ``--algorithms``, sequential and batched engine one after the other in the same process; the ratio
  sequential wall / batched wall (> 1: batched is faster); for IVON rules also the sequential run with the noise
  drawn inline (``inline_over_ahead``: what drawing ahead buys over a round).  ``--skip-run`` leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["main", "step_breakdown"]


@contextlib.contextmanager
def _noise_inline() -> Iterator[None]:
    """Inside the block the trainers draw IVON's noise inline (``FEDBAYES_DRAW_AHEAD=0``); restored after."""
    old = os.environ.get("FEDBAYES_DRAW_AHEAD")
    os.environ["FEDBAYES_DRAW_AHEAD"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FEDBAYES_DRAW_AHEAD", None)
        else:
            os.environ["FEDBAYES_DRAW_AHEAD"] = old


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


def _timed(mode: str, c: int, n: int) -> dict[str, tuple[Callable[[], None], int, int]]:
    """The timed pieces for one optimiser (``ivon`` or ``adam``): name -> (function, repetitions, steps per call)."""
    from fedbayes.batched import stacked_forward, train_batched
    from fedbayes.ivon import IVON
    from fedbayes.local import train_local
    from fedbayes.models import build_model
    from fedbayes.optim import Adam

    model, specs = _clients(c, n, mode)
    x, y = specs[0][1][:64], specs[0][2][:64]
    P = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    loss_fn = nn.functional.cross_entropy

    def fb() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def whole_step(ahead: bool) -> Callable[[], None]:
        net = build_model("mlp", 784, 10, seed=0, hidden=(200, 100))
        if mode == "adam":
            adam = Adam(list(net.parameters()), lr=1e-3)

            def adam_step() -> None:
                adam.zero_grad(set_to_none=True)
                loss_fn(net(x), y).backward()
                adam.step()
            return adam_step
        o = IVON(list(net.parameters()), lr=0.1, ess=6000.0, hess_init=0.1, weight_decay=1e-4,
                 generator=torch.Generator().manual_seed(1))
        if ahead:
            o.plan_draws(10**9)  # the next step's noise drawn on the worker thread (fedbayes.noise)

        def ivon_step() -> None:
            with o.sampled_params(train=True):
                o.zero_grad(set_to_none=True)
                loss_fn(net(x), y).backward()
            o.step()
        return ivon_step

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

    def seq_train() -> None:
        for p, xx, yy, s, sm, sp in specs[:4]:
            train_local(model, p, xx, yy, s, start_mean=sm, start_prec=sp)

    def bat_train() -> None:
        train_batched(model, specs)

    def inline(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with _noise_inline():
                fn()
        return run

    seq_steps = sum(int(s[3].epochs) * -(-len(s[1]) // 64) for s in specs[:4])
    bat_steps = sum(int(s[3].epochs) * -(-len(s[1]) // 64) for s in specs)
    out = {"fb": (fb, 20, 1), "whole": (whole_step(False), 20, 1), "fb_batched": (fb_batched, 5, c),
           "seq": (seq_train, 1, seq_steps), "bat": (bat_train, 1, bat_steps)}
    if mode == "ivon":
        out.update({"whole_ahead": (whole_step(True), 20, 1), "noise": (noise, 20, 1),
                    "seq_inline": (inline(seq_train), 1, seq_steps), "bat_inline": (inline(bat_train), 1, bat_steps)})
    return out


def _summary(med: dict[str, float], c: int, params: int) -> dict[str, Any]:
    """One optimiser's breakdown from the medians of its timed pieces (ms per client-step)."""
    noise_ms = med.get("noise", 0.0)
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
        "whole_step_ms": med["whole"], "params": params,
    }
    if "whole_ahead" in med:
        res["whole_step_ahead_ms"] = med["whole_ahead"]
        res["sequential"]["step_in_trainer_inline_ms"] = med["seq_inline"]
        res["batched"]["step_in_trainer_inline_ms"] = med["bat_inline"]
    return res


def step_breakdown(c: int = 16, n: int = 640, blocks: int = 7) -> dict[str, Any]:
    """The per-step breakdown (ms per client-step) for the sequential and batched trainers, IVON and Adam.

    Every piece of both optimisers is timed in each of ``blocks`` interleaved blocks (machine noise hits all
    alike); a piece's time is the median over blocks, and each IVON/Adam ratio is the median of the per-block
    ratios (robust to the machine's speed drifting between blocks)."""
    pieces = {mode: _timed(mode, c, n) for mode in ("ivon", "adam")}
    for mode in pieces:  # warm-up
        for name in ("fb", "whole", "whole_ahead", "fb_batched", "noise"):
            if name in pieces[mode]:
                pieces[mode][name][0]()
    acc: dict[str, dict[str, list[float]]] = {mode: {k: [] for k in p} for mode, p in pieces.items()}
    for _ in range(blocks):
        for mode, p in pieces.items():
            for name, (fn, reps, per) in p.items():
                acc[mode][name].append(_median_ms(fn, reps) / per)
    from fedbayes.models import build_model

    params = sum(p.numel() for p in build_model("mlp", 784, 10, seed=0, hidden=(200, 100)).parameters())
    out: dict[str, Any] = {mode: _summary({k: statistics.median(v) for k, v in a.items()}, c, params)
                           for mode, a in acc.items()}

    def ratio(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(acc["ivon"][num], acc["adam"][den], strict=True))

    out["ivon_over_adam"] = ratio("whole", "whole")
    out["ivon_over_adam_ahead"] = ratio("whole_ahead", "whole")
    out["ivon_over_adam_in_trainer"] = ratio("seq", "seq")
    out["ivon_over_adam_in_trainer_inline"] = ratio("seq_inline", "seq")
    out["blocks"] = blocks
    return out


def run_ratio(algorithms: list[str], rounds: int, clients: int) -> dict[str, Any]:
    """fmnist-100-het for ``rounds`` rounds, sequential then batched, per rule: wall seconds and their ratio."""
    from fedbayes.config import resolve
    from fedbayes.engine import run_rounds
    from fedbayes.federation import Federation
    from fedbayes.presets import load_preset

    res: dict[str, Any] = {}
    for alg in algorithms:
        row: dict[str, Any] = {}
        mode = load_preset("fmnist-100-het").config_for(alg, {}).get("mode")
        # IVON rules also run sequentially with the noise drawn inline: what drawing ahead buys over a whole round
        variants = ["sequential", "batched"] + (["sequential_inline"] if mode == "ivon" else [])
        for var in variants:
            eng = var.removesuffix("_inline")
            flat = load_preset("fmnist-100-het").config_for(alg, {"rounds": rounds, "num-clients": clients,
                                                                 "client-engine": eng, "bma-samples": 0})
            exp = resolve(flat)
            fed = Federation.build(exp)
            with _noise_inline() if var.endswith("_inline") else contextlib.nullcontext():
                t0 = time.perf_counter()
                rows = run_rounds(fed, exp, [], None, evaluate=False)
                row[var] = {"wall_s": time.perf_counter() - t0, "train_loss": rows[-1]["train_loss"]}
        row["sequential_over_batched"] = row["sequential"]["wall_s"] / row["batched"]["wall_s"]
        if "sequential_inline" in row:
            row["inline_over_ahead"] = row["sequential_inline"]["wall_s"] / row["sequential"]["wall_s"]
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
