"""``fedbayes bench cnn``: the costs of the built-in ``cnn`` on this machine, measured side by side in one process.

* ``step``  — one local IVON step / one Adam step (:class:`fedbayes.ivon.IVON`, :class:`fedbayes.optim.Adam`, the
  clients' own optimisers; batch 64 of 1×28×28 images, 1 MC sample), interleaved in blocks; median of the
  per-block ratios (issue 24 §6: target ≤ 1.15, the IVON paper reports nearly equal cost on convnets).
* ``ggn``   — the diagonal GGN of a Laplace site (:func:`fedbayes.curvature.diag_ggn`, the Conv2d fast path) over
  ``--examples`` Fashion-MNIST images / one local epoch on them (:func:`fedbayes.local.train_local`, Adam, batch
  64), interleaved; and the generic per-example-Jacobian path on a tenth of the examples, scaled ×10 (what it
  cost before the fast path; issue 24 §5: target ≤ 2 epochs).
* ``predictive`` — the linearised predictive's moments f(x; m), J Σ Jᵀ (the default posterior-averaged prediction,
  :func:`fedbayes.predictive.linearized_moments`) on ``--examples`` test images by the per-layer Conv2d path /
  one local epoch on as many training images, and the generic ``vmap(jacrev)`` path on a tenth of them, scaled ×10.
* ``round`` — seconds of one fmnist-10-het round with ``model = cnn`` (bayes-admm: IVON clients), the sequential and
  the batched client engine, alternated ``--round-reps`` times.

Results: ``bench-cnn.json`` in ``--out``.  The machine is shared: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedbayes.models import build_model

__all__ = ["bench_ggn", "bench_predictive", "bench_round", "bench_step", "main"]


def _interleaved(fns: dict[str, Callable[[], Any]], blocks: int, reps: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, ``blocks`` times in turn (``reps`` calls per block)."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out[k].append((time.perf_counter() - t0) / reps)
    return out


def _ratio(t: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    r = [a / b for a, b in zip(t[num], t[den], strict=True)]
    return {f"{num}_s_median": statistics.median(t[num]), f"{den}_s_median": statistics.median(t[den]),
            "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)}


def bench_step(blocks: int = 10, steps: int = 20, batch: int = 64) -> dict[str, Any]:
    from fedbayes.ivon import IVON
    from fedbayes.optim import Adam

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    m_ivon = build_model("cnn", 784, 10, seed=0, input_shape=(1, 28, 28))
    m_adam = build_model("cnn", 784, 10, seed=0, input_shape=(1, 28, 28))
    ivon = IVON(list(m_ivon.parameters()), lr=0.1, ess=6000.0, hess_init=0.1, weight_decay=1e-4,
                generator=torch.Generator().manual_seed(1))
    adam = Adam(list(m_adam.parameters()), lr=1e-3)
    ivon.plan_draws(10**9)  # noise drawn one step ahead, as train_local does
    loss_fn = torch.nn.functional.cross_entropy

    def step_ivon() -> None:
        with ivon.sampled_params(train=True):
            ivon.zero_grad(set_to_none=True)
            loss_fn(m_ivon(x), y).backward()
        ivon.step()

    def step_adam() -> None:
        adam.zero_grad(set_to_none=True)
        loss_fn(m_adam(x), y).backward()
        adam.step()

    _interleaved({"ivon": step_ivon, "adam": step_adam}, 1, 5)  # warm-up
    t = _interleaved({"ivon": step_ivon, "adam": step_adam}, blocks, steps)
    params = sum(p.numel() for p in m_ivon.parameters())
    return {"model": "cnn 1x28x28", "params": params, "batch": batch, "blocks": blocks, "steps_per_block": steps,
            **_ratio(t, "ivon", "adam"), "target_ratio": 1.15}


def bench_ggn(examples: int = 1000, blocks: int = 3) -> dict[str, Any]:
    from fedbayes.curvature import diag_ggn
    from fedbayes.data import load_dataset
    from fedbayes.gaussian import DiagGaussian
    from fedbayes.local import LocalSettings, train_local

    d = load_dataset("fmnist")
    x, y = torch.from_numpy(d.x_train[:examples]), torch.from_numpy(d.y_train[:examples])
    model = build_model("cnn", 784, 10, seed=0, input_shape=tuple(d.input_shape))
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    settings = LocalSettings.model_validate({"mode": "adam", "lr": 1e-3, "epochs": 1, "batch_size": 64, "seed": 0})

    def epoch() -> None:
        train_local(model, prior, x, y, settings)

    def ggn() -> None:
        diag_ggn(model, dict(model.named_parameters()), x)

    t = _interleaved({"ggn": ggn, "epoch": epoch}, blocks)
    tenth = x[: max(1, examples // 10)]
    t0 = time.perf_counter()
    diag_ggn(model, {k: v.detach() for k, v in model.named_parameters()}, tenth)  # detached: the generic path
    generic = (time.perf_counter() - t0) * examples / len(tenth)
    res = {"examples": examples, "blocks": blocks, **_ratio(t, "ggn", "epoch"), "target_ratio": 2.0,
           "generic_s_scaled": generic, "generic_over_epoch": generic / statistics.median(t["epoch"])}
    return res


def bench_predictive(examples: int = 1000, blocks: int = 3) -> dict[str, Any]:
    from fedbayes.data import load_dataset
    from fedbayes.gaussian import DiagGaussian
    from fedbayes.local import LocalSettings, train_local
    from fedbayes.predictive import _moments_jacobian, linearized_moments

    d = load_dataset("fmnist")
    x, y = torch.from_numpy(d.x_train[:examples]), torch.from_numpy(d.y_train[:examples])
    xt = torch.from_numpy(d.x_test[:examples])
    model = build_model("cnn", 784, 10, seed=0, input_shape=tuple(d.input_shape))
    prior = DiagGaussian.isotropic(dict(model.named_parameters()), 1.0)
    settings = LocalSettings.model_validate({"mode": "adam", "lr": 1e-3, "epochs": 1, "batch_size": 64, "seed": 0})
    mean = {k: v.detach().clone() for k, v in model.named_parameters()}
    var = {k: torch.full_like(v, 1e-3, dtype=torch.float64) for k, v in mean.items()}

    def epoch() -> None:
        train_local(model, prior, x, y, settings)

    def layers() -> None:
        linearized_moments(model, mean, var, xt)

    t = _interleaved({"layers": layers, "epoch": epoch}, blocks)
    tenth = xt[: max(1, examples // 10)]
    t0 = time.perf_counter()
    _moments_jacobian(model, mean, var, tenth)
    generic = (time.perf_counter() - t0) * examples / len(tenth)
    return {"examples": examples, "blocks": blocks, **_ratio(t, "layers", "epoch"), "generic_s_scaled": generic,
            "generic_over_layers": generic / statistics.median(t["layers"])}


def bench_round(reps: int = 1, algorithm: str = "bayes-admm") -> dict[str, Any]:
    from fedbayes.config import resolve
    from fedbayes.engine import run_rounds
    from fedbayes.federation import Federation
    from fedbayes.presets import load_preset

    def one(engine: str) -> Callable[[], Any]:
        flat = load_preset("fmnist-10-het").config_for(algorithm, {"model": "cnn", "rounds": 1, "bma-samples": 0,
                                                                   "client-engine": engine})
        exp = resolve(flat)

        def run() -> None:
            fed = Federation.build(exp)
            run_rounds(fed, exp, [], None, evaluate=False)
        return run

    t = _interleaved({"sequential": one("sequential"), "batched": one("batched")}, reps)
    return {"preset": "fmnist-10-het", "model": "cnn", "algorithm": algorithm, "reps": reps,
            **_ratio(t, "sequential", "batched")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedbayes bench cnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/cnn", help="folder for bench-cnn.json (default: %(default)s)")
    p.add_argument("--what", default="step,ggn,predictive,round",
                   help="comma-separated: step, ggn, predictive, round (default: all)")
    p.add_argument("--examples", type=int, default=1000,
                   help="images for the GGN, the predictive and the epoch (default 1000)")
    p.add_argument("--blocks", type=int, default=5, help="interleaved blocks of step and ggn (default 5)")
    p.add_argument("--round-reps", type=int, default=1, help="rounds per engine, alternated (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = p.parse_args(argv)
    parts = [w.strip() for w in a.what.split(",") if w.strip()]
    bad = sorted(set(parts) - {"step", "ggn", "predictive", "round"})
    if bad:
        p.error(f"--what: unknown part(s) {bad}; choose from step, ggn, predictive, round")
    torch.set_num_threads(a.threads)
    res: dict[str, Any] = {"bench": "cnn", "torch": torch.__version__, "threads": torch.get_num_threads()}
    if "step" in parts:
        res["step"] = bench_step(blocks=max(a.blocks, 2))
        print(f"[bench cnn] IVON/Adam step: {res['step']['ratio_median']:.3f}", flush=True)
    if "ggn" in parts:
        res["ggn"] = bench_ggn(a.examples, blocks=a.blocks)
        g = res["ggn"]
        print(f"[bench cnn] GGN/epoch: {g['ratio_median']:.3f} (generic {g['generic_over_epoch']:.1f})", flush=True)
    if "predictive" in parts:
        res["predictive"] = bench_predictive(a.examples, blocks=a.blocks)
        q = res["predictive"]
        print(f"[bench cnn] linearised predictive/epoch: {q['ratio_median']:.3f} (generic path "
              f"{q['generic_over_layers']:.0f}x slower)", flush=True)
    if "round" in parts:
        res["round"] = bench_round(a.round_reps)
        print(f"[bench cnn] round s: sequential {res['round']['sequential_s_median']:.1f}, batched "
              f"{res['round']['batched_s_median']:.1f}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-cnn.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
