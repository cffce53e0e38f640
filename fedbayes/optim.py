"""Small optimisers on one flat buffer per parameter group, without ``torch.optim``.

Why not ``torch.optim``: constructing the first ``torch.optim.Optimizer`` in a process imports
``torch._dynamo`` (2–3 s here), and a Flower deployment starts a fresh ClientApp process for every message.
These classes keep the client's import path light and run each update as a few element-wise kernels over one
vector (the parameters become views into it).

* :class:`FlatOptimizer` — the base: parameter groups, flat buffers, ``zero_grad``, ``state_dict``.
* :class:`Adam` — Kingma & Ba 2015, exactly torch's default (non-AMSGrad, no weight decay):
  m ← β1 m + (1−β1) g,  v ← β2 v + (1−β2) g²,  θ ← θ − α (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε).
* :class:`SGD` — with heavy-ball momentum μ: b ← μ b + g (b = g at t = 1), θ ← θ − α b.

The update maths itself is in :mod:`fedbayes.updates` (shared with the batched clients).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fedbayes.updates import adam_step_, heavy_ball_, sgd_step_

__all__ = ["SGD", "Adam", "FlatOptimizer"]


class FlatOptimizer:
    """Parameter groups whose parameters are views into one flat buffer per group."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        self.defaults = dict(defaults)
        self._scratch_bufs: dict[tuple[int, str], Tensor] = {}
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            group = {**self.defaults, **g, "params": list(g["params"])}
            ps = group["params"]
            if len({(p.dtype, p.device) for p in ps}) != 1:
                raise ValueError("all parameters of a group must share dtype and device")
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            i = 0
            for p in ps:
                n = p.numel()
                p.data = flat[i : i + n].view_as(p)
                i += n
            group["flat"] = flat
            self.param_groups.append(group)

    @staticmethod
    def flat_grad(group: dict[str, Any], out: Tensor | None = None) -> Tensor:
        """The group's gradient as one vector (a parameter without a gradient counts as zero), into ``out`` if
        given."""
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group["params"]]
        return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    def _scratch(self, group: dict[str, Any], name: str) -> Tensor:
        """A scratch vector of the group's size kept between steps (outside ``state_dict``): writing into memory
        the last step used is cheaper than a fresh allocation on a CPU."""
        bufs = self._scratch_bufs
        flat = group["flat"]
        buf = bufs.get((id(group), name))
        if buf is None or buf.shape != flat.shape or buf.dtype != flat.dtype or buf.device != flat.device:
            buf = bufs[(id(group), name)] = torch.empty_like(flat)
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "param_groups": [
                {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in g.items() if k != "params"}
                for g in self.param_groups
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"state has {len(saved)} parameter groups, optimizer has {len(self.param_groups)}")
        for group, s in zip(self.param_groups, saved, strict=True):
            flat = group["flat"]
            if tuple(s["flat"].shape) != tuple(flat.shape):
                raise ValueError(f"state's flat buffer has {s['flat'].numel()} entries, expected {flat.numel()}")
            for k, v in s.items():
                if k == "flat":
                    flat.copy_(v)  # keep the parameters' storage, take the saved values
                else:
                    group[k] = v.clone() if isinstance(v, Tensor) else v


class Adam(FlatOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if not (lr > 0 and math.isfinite(lr)) or not all(0.0 <= b < 1.0 for b in betas) or eps < 0:
            raise ValueError(f"Adam: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "step": 0})
        for g in self.param_groups:
            g["exp_avg"] = torch.zeros_like(g["flat"])
            g["exp_avg_sq"] = torch.zeros_like(g["flat"])

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            g["step"] += 1
            t, (b1, b2) = g["step"], g["betas"]
            grad = self.flat_grad(g, out=self._scratch(g, "grad"))
            adam_step_(g["flat"], g["exp_avg"], g["exp_avg_sq"], grad, self._scratch(g, "denom"), lr=g["lr"],
                       beta1=b1, beta2=b2, step=t, eps=g["eps"])


class SGD(FlatOptimizer):
    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0) -> None:
        if not (lr > 0 and math.isfinite(lr)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: invalid lr={lr} or momentum={momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "step": 0})
        for g in self.param_groups:
            g["buf"] = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            g["step"] += 1
            grad = self.flat_grad(g)
            if g["momentum"] > 0:
                first = g["buf"] is None
                if first:
                    g["buf"] = torch.empty_like(grad)
                grad = heavy_ball_(g["buf"], grad, g["momentum"], first)
            sgd_step_(g["flat"], grad, g["lr"])
