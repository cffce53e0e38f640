"""Exact diagonal curvature of a model's loss: the generalised Gauss-Newton (GGN) diagonal.

Used by the Laplace sites of point-mode clients (FedLap-Cov, a Bayesian rule with an Adam/SGD client) and by the
linearised posterior predictive (:mod:`fedbayes.predictive`).  For networks whose parameters all sit in
``nn.Linear`` layers there is a fast exact path (one backward pass per output class, no per-example Jacobians,
about 1000x faster); any other model falls back to per-example Jacobians in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["diag_ggn", "linear_layers"]


def linear_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The model's parametrised modules if they are all ``nn.Linear`` (else None: use the generic path)."""
    layers = []
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            if not isinstance(m, nn.Linear):
                return None
            layers.append(m)
    return layers


def _diag_ggn_linear(
    model: nn.Module, layers: list[nn.Linear], x: Tensor, loss: str, noise_var: float, chunk: int = 1024
) -> dict[int, tuple[Tensor, Tensor | None]]:
    """Exact diagonal GGN for networks whose parameters all sit in Linear layers, without per-example Jacobians.

    Factor Λᵢ = Σ_c l_c l_cᵀ (cross-entropy: l_c = √p_c (e_c − p); Gaussian: l = 1/σ).  Then
    diag GGN = Σᵢ Σ_c (Jᵢᵀ l_c)², and for a Linear layer z = W a + b the per-example gradient of l_cᵀ f is
    δ aᵀ with δ = ∂(l_cᵀ f)/∂z, so Σᵢ (δᵢ aᵢᵀ)² = (δ²)ᵀ(a²) and the bias gets Σᵢ δᵢ²: one backward pass per
    factor column and one matrix product per layer.
    """
    acts: list[Tensor] = []
    outs: list[Tensor] = []

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        acts.append(inp[0].detach())
        outs.append(out)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    res: dict[int, tuple[Tensor, Tensor | None]] = {
        id(layer): (torch.zeros_like(layer.weight), None if layer.bias is None else torch.zeros_like(layer.bias))
           for layer in layers}
    try:
        for i in range(0, x.shape[0], chunk):
            acts.clear()
            outs.clear()
            with torch.enable_grad():
                f = model(x[i : i + chunk])
                if loss == "ce":
                    p = f.detach().softmax(-1)
                    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
                    cols = [p[:, c : c + 1].sqrt() * (eye[c] - p) for c in range(p.shape[1])]
                else:
                    cols = [torch.full_like(f, 1.0 / math.sqrt(noise_var))]
                for j, l_c in enumerate(cols):
                    deltas = torch.autograd.grad((f * l_c).sum(), outs, retain_graph=j < len(cols) - 1)
                    for layer, a, d in zip(layers, acts, deltas, strict=True):
                        w, b = res[id(layer)]
                        w += (d * d).T @ (a * a)
                        if b is not None:
                            b += (d * d).sum(0)
    finally:
        for h in handles:
            h.remove()
    return res


def diag_ggn(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    loss: str = "ce",
    noise_var: float = 1.0,
    chunk_bytes: int = 64 << 20,
) -> dict[str, Tensor]:
    """Diagonal of the generalised Gauss-Newton of the *summed* loss Σᵢ ℓᵢ at ``params``.

    GGN = Σᵢ Jᵢᵀ Λᵢ Jᵢ with Jᵢ the Jacobian of the outputs; for cross-entropy Λ = diag(p) − ppᵀ, so
    diag = Σᵢ [Σ_c p_c J_c² − (Σ_c p_c J_c)²]; for the Gaussian likelihood Λ = 1/σ².  Exact (no sampling),
    computed with per-example Jacobians in chunks of at most ``chunk_bytes``.
    """
    names = list(params)
    own = dict(model.named_parameters())
    layers = linear_layers(model)
    if layers is not None and all(params[k] is own.get(k) for k in names):
        fast = _diag_ggn_linear(model, layers, x, loss, noise_var)
        by_tensor = {}
        for layer in layers:
            w, b = fast[id(layer)]
            by_tensor[id(layer.weight)] = w
            if layer.bias is not None and b is not None:
                by_tensor[id(layer.bias)] = b
        return {k: by_tensor[id(own[k])] for k in names}
    detached = {k: v.detach() for k, v in params.items()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac_fn = vmap(jacrev(f), in_dims=(None, 0))
    n_params = sum(v.numel() for v in detached.values())
    with torch.no_grad():
        n_out = int(functional_call(model, detached, (x[:1],)).shape[-1])
    chunk = max(1, int(chunk_bytes // max(1, n_out * n_params * x.element_size())))
    out = {k: torch.zeros_like(v) for k, v in detached.items()}
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        jac = jac_fn(detached, xb)  # name -> (b, C, *shape)
        if loss == "ce":
            with torch.no_grad():
                p = functional_call(model, detached, (xb,)).softmax(-1)  # (b, C)
            for k in names:
                j = jac[k].reshape(jac[k].shape[0], n_out, -1)
                pj = (p[:, :, None] * j).sum(1)
                out[k] += ((p[:, :, None] * j * j).sum(1) - pj * pj).sum(0).reshape(out[k].shape)
        else:
            for k in names:
                j = jac[k].reshape(jac[k].shape[0], n_out, -1)
                out[k] += (j * j).sum((0, 1)).reshape(out[k].shape) / noise_var
    return out
