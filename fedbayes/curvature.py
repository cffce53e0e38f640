"""Exact diagonal curvature of a model's loss: the generalised Gauss-Newton (GGN) diagonal.

Used by the Laplace sites of point-mode clients (FedLap-Cov, a Bayesian rule with an Adam/SGD client) and by the
linearised posterior predictive (:mod:`fedbayes.predictive`).  For networks whose parameters all sit in
``nn.Linear`` and ``nn.Conv2d`` layers (the MLP, ``cnn``) there is a fast exact path (one backward pass per output
class to the layers' outputs, then per layer one product; :func:`_diag_ggn_fast`); any other model (normalisation
layers, embeddings, ``resnet20``'s GroupNorm) falls back to per-example Jacobians in chunks, which is also the
reference the fast path is tested against (to 1e-9 in float64, tests/test_local.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["diag_ggn", "fast_layers", "linear_layers"]

FastLayer = nn.Linear | nn.Conv2d


def linear_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The model's parametrised modules if they are all ``nn.Linear`` (else None: use the generic path)."""
    layers = fast_layers(model)
    if layers is None or not all(isinstance(m, nn.Linear) for m in layers):
        return None
    return [m for m in layers if isinstance(m, nn.Linear)]


def fast_layers(model: nn.Module) -> list[FastLayer] | None:
    """The model's parametrised modules if each is an ``nn.Linear`` on (batch, features) or an ``nn.Conv2d`` with
    ``groups=1`` and zero padding, each used once per forward (else None: use the generic path)."""
    layers: list[FastLayer] = []
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                return None
            if not isinstance(m, nn.Linear | nn.Conv2d):
                return None
            layers.append(m)
    return layers


def _conv_sq_grads(layer: nn.Conv2d, a: Tensor, u: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Σᵢ of the squared per-example gradients of a Conv2d's weight and bias, given the unfolded input
    uᵢ = unfold(aᵢ) (K × L: K = C_in·kh·kw, L output positions) and δᵢ = ∂(l_cᵀ f)/∂zᵢ (O × L): the weight's
    gradient of example i is δᵢ uᵢᵀ (O × K), the bias's Σ_l δᵢ[:, l]."""
    d = d.reshape(d.shape[0], d.shape[1], -1)
    g = torch.bmm(d, u.transpose(1, 2))
    return (g * g).sum(0).reshape(layer.weight.shape), d.sum(2).square().sum(0)


def _diag_ggn_fast(
    model: nn.Module, layers: list[FastLayer], x: Tensor, loss: str, noise_var: float, chunk_bytes: int = 64 << 20
) -> dict[int, tuple[Tensor, Tensor | None]]:
    """Exact diagonal GGN for networks whose parameters all sit in Linear and Conv2d layers, without per-example
    Jacobians of the whole parameter vector.

    Factor Λᵢ = Σ_c l_c l_cᵀ (cross-entropy: l_c = √p_c (e_c − p), so Σ_c l_c l_cᵀ = diag p − ppᵀ; Gaussian:
    l_c = e_c/σ, one column per output).  Then diag GGN = Σᵢ Σ_c (Jᵢᵀ l_c)², and Jᵢᵀ l_c restricted to a layer's
    weights is the per-example gradient of l_cᵀ fᵢ (l_c held fixed): with δ = ∂(l_cᵀ f)/∂z at the layer's output z,

    * Linear z = W a + b: δᵢ aᵢᵀ, so Σᵢ (δᵢ aᵢᵀ)² = (δ²)ᵀ(a²) and the bias gets Σᵢ δᵢ²;
    * Conv2d z = W ⋆ a + b, i.e. zᵢ = W uᵢ + b with uᵢ = unfold(aᵢ) (K × L): δᵢ uᵢᵀ (O × K), squared and summed
      over i (:func:`_conv_sq_grads`); the bias gets Σᵢ (Σ_l δᵢ[:, l])².  The sum over positions l sits inside the
      square, so a convolution needs the per-example products (N·O·K·L multiply-adds per column), not one product.

    One backward pass per factor column (C for cross-entropy) from the output to every layer's z.  Examples go in
    chunks whose unfolded inputs and per-example gradients take at most about ``chunk_bytes``.
    """
    acts: list[Tensor] = []
    outs: list[Tensor] = []

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        acts.append(inp[0].detach())
        outs.append(out)

    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    chunk = 1024
    if convs:  # bytes per example of the unfolded inputs and the per-example weight gradients, from one example
        sizes: list[int] = []

        def size(m: nn.Module, i: tuple[Tensor, ...], o: Tensor) -> None:  # K·(L + O): uᵢ and δᵢuᵢᵀ
            w = m.weight
            assert isinstance(w, Tensor)
            sizes.append(w[0].numel() * (o[0, 0].numel() + int(w.shape[0])))

        hs = [m.register_forward_hook(size) for m in convs]
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            for h in hs:
                h.remove()
        chunk = max(1, min(chunk, chunk_bytes // max(1, sum(sizes) * x.element_size())))
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
                if len(outs) != len(layers):
                    raise RuntimeError("a layer ran more or less than once per forward")
                unfolded = [None if isinstance(m, nn.Linear) else nn.functional.unfold(
                    a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # type: ignore[arg-type]
                    for m, a in zip(layers, acts, strict=True)]
                if loss == "ce":
                    p = f.detach().softmax(-1)
                    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
                    cols = [p[:, c : c + 1].sqrt() * (eye[c] - p) for c in range(p.shape[1])]
                else:  # one column per output: l_c = e_c/σ
                    cols = []
                    for c in range(f.shape[1]):
                        cols.append(torch.zeros_like(f))
                        cols[-1][:, c] = 1.0 / math.sqrt(noise_var)
                for j, l_c in enumerate(cols):
                    deltas = torch.autograd.grad((f * l_c).sum(), outs, retain_graph=j < len(cols) - 1)
                    for layer, a, u, d in zip(layers, acts, unfolded, deltas, strict=True):
                        w, b = res[id(layer)]
                        if u is None:
                            w += (d * d).T @ (a * a)
                            if b is not None:
                                b += (d * d).sum(0)
                        else:
                            gw, gb = _conv_sq_grads(layer, a, u, d)  # type: ignore[arg-type]
                            w += gw
                            if b is not None:
                                b += gb
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
    layers = fast_layers(model)
    if layers is not None and all(params[k] is own.get(k) for k in names):
        fast = _diag_ggn_fast(model, layers, x, loss, noise_var)
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
