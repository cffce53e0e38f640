"""Batched clients: the participants of a round train as one model whose parameters carry a leading client axis.

The local problem of every client is exactly :func:`fedbayes.local.train_local`'s (same prior, warm start, ess,
learning rate, minibatch order and IVON noise); only the arithmetic is shared.  C clients' means live in one
(C, P) buffer M, every optimiser state (IVON's h and momentum, Adam's moments, SGD's buffer) in buffers of the
same shape, and one step is

    θ = M + ε / √(ess·(h + δ))                      (IVON; θ = M for Adam/SGD)
    out_k = f(θ_k, x_k)                              (:func:`stacked_forward`: baddbmm over k, or vmap)
    g = ∂/∂θ Σ_k ℓ̄_k(θ_k)                            (one backward: client k's loss depends on θ_k only)

followed by the element-wise update of :class:`fedbayes.ivon.IVON`, :class:`fedbayes.optim.Adam` or
:class:`fedbayes.optim.SGD`, written over the client axis with per-client ess, learning rate and prior.

Exactness with the sequential path (tested to 1e-5 relative in float32, rule by rule):

* **minibatch order**: client k's batches are drawn up front from its own ``torch.Generator`` seeded with its
  seed, one ``randperm`` per epoch, exactly as :class:`fedbayes.local._Fit` draws them;
* **noise**: client k's ε comes from its own generator seeded with seed + 1, one ``randn`` of P values per
  sample (antithetic pairs reuse −ε), as in :meth:`fedbayes.ivon.IVON._noise`;
* **different sizes**: a client runs its own number of steps (epochs · ⌈Nₖ/B⌉, or ``max-steps``); clients are
  sorted by their step count, so the clients still training at step t are a prefix M[:c_t] of the buffer and a
  finished client is neither computed nor changed (never given extra steps);
* a last, short batch of an epoch is padded to B with weight 0; the mean loss is Σ wᵢℓᵢ with wᵢ = 1/bₜ.

What differs is float rounding only (batched matrix products, the weighted mean), hence 1e-5 and not bit
identity.  Clients are trained in chunks of ``batch-clients`` (0: as many as fit in a memory budget, see
:func:`chunk_size`).  ``mode = "lbfgs"`` (full batch, line search) and models with buffers or random layers
are not batched (:func:`check_batchable` says why).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedbayes.gaussian import DiagGaussian
from fedbayes.ivon import site_eta, split_natural
from fedbayes.local import (
    ADAM_BETA2,
    IVON_BETA2,
    LocalResult,
    LocalSettings,
    _check_data,
    check_stateless,
    initial_curvature,
    laplace_site,
)
from fedbayes.noise import ahead_enabled, run_ahead

__all__ = [
    "BATCHED_MODES", "CPU_CHUNK_BYTES", "Unbatchable", "check_batchable", "chunk_size", "client_bytes",
    "execute_batched", "model_client_bytes", "stacked_forward", "train_batched",
]

BATCHED_MODES = ("ivon", "adam", "sgd")
ADAM_EPS = 1e-8
"""Adam's ε, torch's default, as :class:`fedbayes.optim.Adam`."""


class Unbatchable(ValueError):
    """The model or the settings cannot be trained by the batched path (the message says why)."""


# ------------------------------------------------------------------------------------------------ checks
_RANDOM_OR_STATEFUL = (nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.modules.batchnorm._NormBase)


def check_batchable(model: nn.Module, example: Tensor | None = None) -> None:
    """Raise :class:`Unbatchable` naming why ``model`` cannot be vectorised over clients: buffers (in-place
    state), random layers (dropout draws would not match the sequential path's), or a forward that
    ``torch.func.vmap`` rejects (tried on two stacked copies of the weights and ``example``, one input of batch
    size 1; None: :func:`_probe_input`).

    Raises
    ------
    fedbayes.local.StatefulModelError
        A normalisation layer with running statistics (:func:`fedbayes.local.check_stateless`): refused on every
        path, not only the batched one.
    Unbatchable
        As above."""
    check_stateless(model)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise Unbatchable(f"the model has buffers {buffers[:3]} (in-place state such as BatchNorm's running "
                          "statistics): one copy cannot serve a batch of clients")
    for name, mod in model.named_modules():
        if isinstance(mod, _RANDOM_OR_STATEFUL):
            raise Unbatchable(f"module '{name}' ({type(mod).__name__}) is random or keeps state: its draws would "
                              "not match the sequential path's")
    named = dict(model.named_parameters())
    if not named:
        raise Unbatchable("the model has no parameters")
    try:
        stacked = {k: torch.stack([v.detach(), v.detach()]) for k, v in named.items()}
        first = next(iter(named.values()))
        x = _probe_input(model, first) if example is None else example[:1].to(device=first.device, dtype=first.dtype)
        if x is not None:
            torch.func.vmap(lambda p, xb: torch.func.functional_call(model, p, (xb,)))(stacked, x.expand(2, *x.shape))
    except Exception as e:  # vmap's own errors are of many kinds
        raise Unbatchable(f"torch.func.vmap cannot vectorise the model's forward: {type(e).__name__}: {e}") from None


def _probe_input(model: nn.Module, first: Tensor) -> Tensor | None:
    """A one-example input for the trial forward: zeros of the model's ``input_shape`` attribute (every model of
    :mod:`fedbayes.models` has one), else of the width of the first parametrised module if it is a Linear layer
    (None: unknown input, skip the trial; :func:`train_batched` tries the clients' own data)."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return torch.zeros(1, *shape, dtype=first.dtype, device=first.device)
    for mod in model.modules():
        if any(True for _ in mod.parameters(recurse=False)):
            if isinstance(mod, nn.Linear):
                return torch.zeros(1, mod.in_features, dtype=first.dtype, device=first.device)
            return None
    return None


_ELEMENTWISE = {nn.Sigmoid: torch.sigmoid, nn.ReLU: torch.relu, nn.Tanh: torch.tanh,
                nn.GELU: nn.functional.gelu}


def stacked_forward(model: nn.Module) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """f(params, x) with a leading client axis on both: for an ``nn.Sequential`` of Flatten, Linear layers and
    element-wise activations (every model of :mod:`fedbayes.models`), the stacked-weight network written with
    ``torch.baddbmm`` over activations laid out (clients, features, batch); any other model through
    ``torch.func.vmap`` of ``functional_call``."""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else []
    plan: list[tuple[str, Any]] = []
    for i, mod in enumerate(mods):
        if isinstance(mod, nn.Flatten) and i == 0 and mod.start_dim == 1 and mod.end_dim == -1:
            plan.append(("flatten", None))
        elif isinstance(mod, nn.Linear) and mod.bias is not None:
            plan.append(("linear", str(i)))
        elif type(mod) in _ELEMENTWISE and (not isinstance(mod, nn.GELU) or mod.approximate == "none"):
            plan.append(("act", _ELEMENTWISE[type(mod)]))
        else:
            plan = []
            break
    if not plan:
        return torch.func.vmap(lambda p, xb: torch.func.functional_call(model, p, (xb,)))  # type: ignore[no-any-return]

    def forward(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
        # activations kept as (clients, features, batch): each layer is W @ h + b, so the backward pass forms each
        # weight's gradient directly in the weight's own (out, in) layout (x @ Wᵀ would give it transposed and
        # cost a copy per weight and step: 20 % of a client's forward+backward)
        h = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        for kind, arg in plan:
            if kind == "linear":
                h = torch.baddbmm(p[arg + ".bias"].unsqueeze(2), p[arg + ".weight"], h)
            elif kind == "act":
                h = arg(h)
        return h.transpose(1, 2)

    return forward


def _group_key(s: LocalSettings) -> tuple[Any, ...]:
    """Settings that must agree within one batch (the rest, lr, ess, seed, epochs, max-steps, hess-init, may differ
    per client)."""
    return (s.mode, s.batch_size, s.mc_samples, s.antithetic, s.beta1, s.beta2, s.clip_radius, s.laplace,
            s.momentum, s.grad_clip, s.prior_per_example, s.signed_site, s.loss, s.noise_var, s.device)


# ------------------------------------------------------------------------------------------------ memory
def client_bytes(num_params: int, batch_size: int, width: int, mode: str = "ivon") -> int:
    """Bytes one client of a batch needs: its (C, P) float32 buffers (mean, sample, gradient, optimiser state and
    temporaries: ~16 for IVON, ~10 for Adam/SGD) and the activations of a batch (``width``: the sum of the
    layers' output widths)."""
    per_param = 16 if mode == "ivon" else 10
    return 4 * (per_param * num_params + 4 * batch_size * width)


def model_client_bytes(model: nn.Module, batch_size: int, mode: str) -> int:
    """:func:`client_bytes` for ``model``: its parameter count and the summed output sizes of its layers for one
    example (measured by one forward of zeros where the model states its ``input_shape``, as the built-in models
    do: a convolution's output is channels × height × width; otherwise the summed widths of its Linear layers)."""
    num_params = sum(p.numel() for p in model.parameters())
    return client_bytes(num_params, batch_size, _activation_width(model), mode)


def _activation_width(model: nn.Module) -> int:
    linear = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear)) or 1
    first = next(model.parameters(), None)
    shape = getattr(model, "input_shape", None)
    if first is None or not isinstance(shape, tuple):
        return linear
    total = 0

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape, dtype=first.dtype, device=first.device))
    except Exception:  # a model that does not take its stated shape: the trial forward reports it elsewhere
        return linear
    finally:
        for h in handles:
            h.remove()
    return max(total, linear)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


CPU_CHUNK_BYTES = 48 * 2**20
"""On a CPU, the automatic chunk keeps the clients' buffers about the size of a last-level cache: beyond it the
element-wise optimiser passes stream from memory (papers' MLP, IVON, one thread: 2.2 ms per client-step at 4
clients, 2.6 at 16, ~3 at 100)."""


def chunk_size(requested: int, clients: int, per_client: int, device: torch.device) -> int:
    """How many clients train at once: ``requested`` (> 0) if it fits, else raises ``ValueError`` before any
    training; 0 = automatic: on a GPU as many as fit in half the free memory, on a CPU as many as fit in
    :data:`CPU_CHUNK_BYTES` (at least one)."""
    avail = _available_bytes(device)
    if requested > 0:
        need = requested * per_client
        if need > avail:
            raise ValueError(f"batch-clients = {requested} needs about {need / 2**30:.2f} GiB for its buffers, "
                             f"{avail / 2**30:.2f} GiB available on {device}: lower batch-clients (0 = automatic)")
        return min(requested, clients)
    budget = avail // 2 if device.type == "cuda" else min(avail // 2, CPU_CHUNK_BYTES)
    return max(1, min(clients, budget // max(per_client, 1)))


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class _Client:
    """One client of a batch: its data, prior, warm start and settings, as :func:`train_local` takes them."""

    index: int
    x: Tensor
    y: Tensor
    prior: DiagGaussian
    settings: LocalSettings
    start_mean: Mapping[str, Tensor] | None
    start_prec: Mapping[str, Tensor] | None
    ess: float = 0.0
    steps: int = 0
    batches: list[Tensor] | None = None


def _plan(c: _Client) -> None:
    """ess, the batch order (drawn exactly as :meth:`fedbayes.local._Fit.batches`) and the step count."""
    s = c.settings
    n = int(c.x.shape[0])
    c.ess = n / (s.temperature * s.ess_scale)
    b = min(s.batch_size, n)
    gen = torch.Generator().manual_seed(s.seed)
    out: list[Tensor] = []
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + b] for i in range(0, n, b)]
        if s.max_steps and len(out) >= s.max_steps:
            break
    c.batches = out[: s.max_steps] if s.max_steps else out
    c.steps = len(c.batches)


# ------------------------------------------------------------------------------------------------ training
def train_batched(
    model: nn.Module,
    clients: Sequence[tuple[DiagGaussian, Tensor, Tensor, LocalSettings, Mapping[str, Tensor] | None,
                            Mapping[str, Tensor] | None]],
    *,
    batch_clients: int = 0,
) -> list[LocalResult | Exception]:
    """Train every client ``(prior, x, y, settings, start_mean, start_prec)`` as :func:`fedbayes.local.train_local`
    would, batched; returns one :class:`LocalResult` per client in the given order, or the exception that client's
    training raised (``FloatingPointError`` for a diverged client: the others are unaffected).

    Clients whose settings differ in more than lr, ess, seed, epochs, max-steps and hess-init are trained in
    separate batches; each batch is cut into chunks of ``batch_clients`` (0: automatic, :func:`chunk_size`).

    Raises
    ------
    Unbatchable
        The model cannot be vectorised, or a client's mode is not one of :data:`BATCHED_MODES`.
    ValueError
        ``batch_clients`` does not fit in memory (raised before any training).
    """
    check_batchable(model, clients[0][1] if clients and len(clients[0][1]) else None)
    named0 = dict(model.named_parameters())
    shapes = {k: tuple(v.shape) for k, v in named0.items()}
    items: list[_Client] = []
    for i, (prior, x, y, s, sm, sp) in enumerate(clients):
        if s.mode not in BATCHED_MODES:
            raise Unbatchable(f"client {i}: mode '{s.mode}' is not batched (batched modes: {list(BATCHED_MODES)})")
        _check_data(x, y)
        prior.validate(named0, min_prec=None, what="prior")
        if s.prior_per_example:
            prior = prior.scale(len(x) / (s.temperature * s.ess_scale))
        c = _Client(i, x, y, prior, s, sm, sp)
        _plan(c)
        items.append(c)
    results: list[LocalResult | Exception | None] = [None] * len(items)
    groups: dict[tuple[Any, ...], list[_Client]] = {}
    for c in items:
        groups.setdefault(_group_key(c.settings), []).append(c)
    plans = []
    for group in groups.values():
        group.sort(key=lambda c: -c.steps)  # the clients still training at step t are a prefix
        s = group[0].settings
        device = torch.device(s.device)
        per = model_client_bytes(model, s.batch_size, s.mode)
        size = chunk_size(batch_clients, len(group), per, device)  # raises before any training
        plans += [(group[i : i + size], device) for i in range(0, len(group), size)]
    for chunk, device in plans:
        for c, res in zip(chunk, _train_chunk(model, shapes, chunk, device), strict=True):
            results[c.index] = res
    # as after the sequential loop: the global generator seeded with the last client's seed (stochastic layers
    # are refused, so nothing drew from it)
    if items:
        torch.default_generator.manual_seed(items[-1].settings.seed)
    return [r if r is not None else RuntimeError("client not trained") for r in results]


def _stack(rows: Sequence[Mapping[str, Tensor]], names: Sequence[str], device: torch.device,
           dtype: torch.dtype) -> Tensor:
    return torch.stack([torch.cat([r[k].reshape(-1).to(device=device, dtype=dtype) for k in names]) for r in rows])


def _train_chunk(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], chunk: list[_Client],
                 device: torch.device) -> list[LocalResult | Exception]:
    t0 = time.perf_counter()
    model.to(device)
    named = dict(model.named_parameters())
    names = list(named)
    dtype = next(iter(named.values())).dtype
    numels = [int(math.prod(shapes[k])) for k in names]
    s0 = chunk[0].settings
    C = len(chunk)
    # the data of the chunk, one tensor; each step gathers a (C, B) index block from it
    xs = torch.cat([c.x for c in chunk]).to(device)
    ys = torch.cat([c.y for c in chunk]).to(device)
    ys = ys.long() if s0.loss == "ce" else ys.to(dtype)
    offsets = np.cumsum([0] + [len(c.x) for c in chunk])[:-1]
    B = max(min(c.settings.batch_size, len(c.x)) for c in chunk)
    T = chunk[0].steps
    idx = torch.zeros(T, C, B, dtype=torch.long)
    wts = torch.zeros(T, C, B, dtype=dtype)
    for j, c in enumerate(chunk):
        assert c.batches is not None
        for t, b in enumerate(c.batches):
            idx[t, j, : len(b)] = b + int(offsets[j])
            wts[t, j, : len(b)] = 1.0 / len(b)
    idx, wts = idx.to(device), wts.to(device)
    active = [sum(1 for c in chunk if c.steps > t) for t in range(T)]
    # means, priors (split as IVON splits them: center c, linear part r, precision s_π) and per-client scalars
    init = {k: v.detach().clone() for k, v in named.items()}  # restored at the end (a Laplace site loads weights)
    M = _stack([c.start_mean if c.start_mean is not None else init for c in chunk], names, device, dtype)
    centers, lins, precs = [], [], []
    for c in chunk:
        e64 = torch.cat([c.prior.eta[k].reshape(-1).double() for k in names])
        p64 = torch.cat([c.prior.prec[k].reshape(-1).double() for k in names])
        cen, lin = split_natural(e64, p64)
        centers.append(cen.to(device=device, dtype=dtype))
        lins.append(lin.to(device=device, dtype=dtype))
        precs.append(p64.to(device=device, dtype=dtype))
    center, lin, prec = torch.stack(centers), torch.stack(lins), torch.stack(precs)
    ess = torch.tensor([[c.ess] for c in chunk], dtype=dtype, device=device)
    lr = torch.tensor([[c.settings.lr] for c in chunk], dtype=dtype, device=device)

    def split(flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, n in zip(names, numels, strict=True):
            out[k] = flat[:, i : i + n].view(flat.shape[0], *shapes[k])
            i += n
        return out

    fwd = stacked_forward(model)
    loss_kind, nv = s0.loss, s0.noise_var

    gbuf = torch.empty_like(M)

    def loss_and_grad(theta: Tensor, t: int, c: int, penalty: bool = False) -> tuple[Tensor, Tensor]:
        """Each client's mean minibatch loss at θ[:c] (plus, for point modes, its prior term / ess in the
        gradient) and the gradient, (c, P).  The per-parameter tensors are leaves sharing θ's storage, so the
        backward pass writes each parameter's gradient once (slicing one leaf would zero-fill a (c, P) buffer per
        parameter)."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in split(theta).items()}
        ib, wb = idx[t, :c], wts[t, :c]
        with torch.enable_grad():
            flat_ib = ib.reshape(-1)
            out = fwd(leaves, xs.index_select(0, flat_ib).view(c, ib.shape[1], *xs.shape[1:]))
            yb = ys.index_select(0, flat_ib).view(c, -1)
            if loss_kind == "ce":
                per = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1), reduction="none")
            else:
                per = (out.reshape(-1) - yb.reshape(-1)) ** 2 / (2 * nv)
            data = (per.view(c, -1) * wb).sum(1)
            total = data.sum()
            if penalty:
                pieces = [split(prec[:c]), split(center[:c]), split(lin[:c])]
                pen = sum(((0.5 * (pieces[0][k] * (v - pieces[1][k]) ** 2) - pieces[2][k] * v).reshape(c, -1).sum(1)
                           for k, v in leaves.items()), torch.zeros(c, dtype=dtype, device=device))
                total = total + (pen * inv_ess[:c, 0]).sum()
            grads = torch.autograd.grad(total, list(leaves.values()))
        g = torch.cat([gr.reshape(c, -1) for gr in grads], dim=1, out=gbuf[:c])
        return data.detach(), g

    inv_ess = 1.0 / ess
    loss_sum = torch.zeros(C, dtype=torch.float64, device=device)
    extra: list[dict[str, float]] = [{} for _ in chunk]
    if s0.mode == "ivon":
        site_parts = _ivon_chunk(chunk, M, center, lin, prec, ess, lr, names, device, dtype, T, active,
                                 loss_and_grad, loss_sum, extra)
    else:
        site_parts = None
        _point_chunk(chunk, M, center, lin, prec, ess, lr, T, active, loss_and_grad, loss_sum)
    seconds = time.perf_counter() - t0
    total_steps = sum(c.steps for c in chunk)
    results: list[LocalResult | Exception] = []
    for j, c in enumerate(chunk):
        row = M[j]
        if not bool(torch.isfinite(row).all()):
            bad = next(k for k, v in split(M[j : j + 1]).items() if not bool(torch.isfinite(v).all()))
            results.append(FloatingPointError(f"local training diverged: parameter '{bad}' is not finite (lower lr?)"))
            continue
        mean = {k: v[0].detach().to("cpu").clone() for k, v in split(M[j : j + 1]).items()}
        site: DiagGaussian | None = None
        if site_parts is not None:
            site = site_parts(j)
        elif c.settings.laplace:
            with torch.no_grad():
                for k, p in named.items():
                    p.copy_(mean[k].to(device))
            site = laplace_site(model, named, c.prior, c.x.to(device), c.ess, c.settings.loss,
                                c.settings.noise_var).to(device="cpu")
        samples = c.steps * (c.settings.mc_samples if c.settings.mode == "ivon" else 1)
        metrics = {"train_loss": float(loss_sum[j]) / max(samples, 1), "steps": float(c.steps),
                   "train_seconds": seconds * c.steps / max(total_steps, 1), **extra[j]}
        results.append(LocalResult(mean=mean, site=site, num_examples=len(c.x), metrics=metrics))
    with torch.no_grad():  # the model's weights as they were (a Laplace site loads each client's into it)
        for k, p in named.items():
            p.copy_(init[k])
    return results


def _ivon_chunk(chunk: list[_Client], M: Tensor, center: Tensor, lin: Tensor, prec: Tensor, ess: Tensor,
                lr: Tensor, names: list[str], device: torch.device, dtype: torch.dtype, T: int, active: list[int],
                loss_and_grad: Any, loss_sum: Tensor, extra: list[dict[str, float]]) -> Any:
    """IVON over the client axis (:class:`fedbayes.ivon.IVON`'s update, term by term); returns site(j)."""
    s0 = chunk[0].settings
    b1, b2 = s0.beta1, float(s0.beta2 or IVON_BETA2)
    S, anti, clip = s0.mc_samples, s0.antithetic, s0.clip_radius
    delta = prec / ess
    hess = torch.stack([
        torch.cat([h.reshape(-1) for h in initial_curvature(
            {k: c.prior.prec[k] for k in names}, c.ess, c.settings.hess_init, c.start_prec, device=device,
            dtype=dtype)])
        for c in chunk])
    mom = torch.zeros_like(M)
    hd = hess + delta
    inv_sigma = (hd * ess).sqrt_()
    inv_ess = 1.0 / ess
    has_lin = bool(lin.any())  # a linear prior term only where a prior precision is 0: usually none
    neg_inv_ess, neg_lr = -inv_ess, -lr
    gens = [torch.Generator(device=device).manual_seed(c.settings.seed + 1) for c in chunk]
    P = M.shape[1]

    def draw(c: int) -> Callable[[], Tensor]:
        def job() -> Tensor:  # client j's ε from its own generator, as IVON._draw makes it
            eps = torch.empty(c, P, dtype=dtype, device=device)
            for j in range(c):
                torch.randn(P, generator=gens[j], dtype=dtype, device=device, out=eps[j])
            return eps
        return job

    theta_buf, hh_buf, tmp = torch.empty_like(M), torch.empty_like(M), torch.empty_like(M)  # reused every step
    # the draws of every step and sample in order (one per antithetic pair), made one ahead on the noise thread
    fresh = [smp for smp in range(S) if not (anti and smp % 2 == 1)]
    draws = run_ahead((draw(active[t]) for t in range(T) for _ in fresh), ahead_enabled(device))
    for t in range(T):
        c = active[t]
        m, h = M[:c], hess[:c]
        g_avg = hh_avg = None
        prev: Tensor | None = None
        for smp in range(S):
            eps = prev.neg() if anti and smp % 2 == 1 and prev is not None else next(draws)
            prev = eps
            losses, g = loss_and_grad(torch.addcdiv(m, eps, inv_sigma[:c], out=theta_buf[:c]), t, c)
            if S > 1:
                g = g.clone()  # the gradient buffer is reused by the next sample
            loss_sum[:c] += losses.double()
            # ĥ's sample into the running mean's buffer (first sample) or scratch (later ones), as IVON does
            gx = torch.mul(g, eps, out=(hh_buf if smp == 0 else tmp)[:c]).mul_(inv_sigma[:c])
            if smp == 0:
                g_avg, hh_avg = g, gx
            else:
                assert g_avg is not None and hh_avg is not None
                g_avg.add_(g.sub_(g_avg), alpha=1.0 / (smp + 1))
                hh_avg.add_(gx.sub_(hh_avg), alpha=1.0 / (smp + 1))
        assert g_avg is not None and hh_avg is not None
        with torch.no_grad():
            step = t + 1
            debias = 1.0 - b1**step
            mom[:c].lerp_(g_avg, 1.0 - b1)
            corr = torch.sub(h, hh_avg, out=tmp[:c]).square_().div_(hd[:c])
            h.lerp_(hh_avg, 1.0 - b2).add_(corr, alpha=0.5 * (1.0 - b2) ** 2)
            # h + δ and σ⁻¹ = √(ess(h + δ)) written straight into their buffers (no copy), the per-client
            # learning rate and 1/ess folded into one addcmul each
            denom = torch.add(h, delta[:c], out=hd[:c])
            num = torch.sub(m, center[:c], out=tmp[:c]).mul_(delta[:c])
            num.add_(mom[:c], alpha=1.0 / debias)
            if has_lin:
                num.addcmul_(lin[:c], neg_inv_ess[:c])
            upd = num.div_(denom)
            if math.isfinite(clip):
                upd.clamp_(-clip, clip)
            m.addcmul_(upd, neg_lr[:c])
            torch.mul(denom, ess[:c], out=inv_sigma[:c]).sqrt_()
    for j, cl in enumerate(chunk):
        extra[j]["site_clamped"] = 0.0 if cl.settings.signed_site else float(int((hess[j] < 0).sum()))

    def site(j: int) -> DiagGaussian:
        """s̃ = ess·h (signed, or clamped at 0), η̃ = s̃ ⊙ m + s_π ⊙ (m − c) − r in float64 (:meth:`IVON.site`)."""
        cl = chunk[j]
        out_e: dict[str, Tensor] = {}
        out_p: dict[str, Tensor] = {}
        m64 = M[j].double()
        s_site = cl.ess * hess[j].double()
        if not cl.settings.signed_site:
            s_site = s_site.clamp_min(0.0)
        i = 0
        for k in names:
            sh = cl.prior.prec[k].shape
            n = int(math.prod(sh))
            cen, lin64 = split_natural(cl.prior.eta[k].reshape(-1), cl.prior.prec[k].reshape(-1))
            s_pi = cl.prior.prec[k].reshape(-1).double().to(device)
            ss, mm = s_site[i : i + n], m64[i : i + n]
            out_e[k] = site_eta(ss, mm, s_pi, cen.to(device), lin64.to(device)).view(sh).cpu()
            out_p[k] = ss.view(sh).cpu().clone()
            i += n
        return DiagGaussian(out_e, out_p)

    return site


def _point_chunk(chunk: list[_Client], M: Tensor, center: Tensor, lin: Tensor, prec: Tensor, ess: Tensor,
                 lr: Tensor, T: int, active: list[int], loss_and_grad: Any, loss_sum: Tensor) -> None:
    """Adam or SGD on θ = argmin ℓ̄(θ) + [½ Σ s_π(θ − c)² − r·θ]/ess, per client (:func:`fedbayes.local._fit_point`)."""
    s0 = chunk[0].settings
    neg = [c.index for j, c in enumerate(chunk) if bool((prec[j] < 0).any())]
    if neg:
        raise ValueError(f"point mode '{s0.mode}' got a prior with negative precision (clients {neg[:3]}): the "
                         "local objective is unbounded below (an ADMM factor such as bayes-admm's needs mode=ivon)")
    has_prior = bool(prec.any()) or bool(lin.any())  # a flat prior (FedAvg): no penalty to form
    adam = s0.mode == "adam"
    b1, b2 = s0.beta1, float(s0.beta2 or ADAM_BETA2)
    exp_avg = torch.zeros_like(M) if adam else None
    exp_avg_sq = torch.zeros_like(M) if adam else None
    buf = torch.zeros_like(M) if s0.momentum > 0 else None
    for t in range(T):
        c = active[t]
        m = M[:c]
        data, g = loss_and_grad(m, t, c, penalty=has_prior)
        loss_sum[:c] += data.double()
        with torch.no_grad():
            if s0.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_, per client
                norm = g.norm(dim=1, keepdim=True)
                g.mul_((s0.grad_clip / (norm + 1e-6)).clamp_max_(1.0))
            step = t + 1
            if adam:
                assert exp_avg is not None and exp_avg_sq is not None
                exp_avg[:c].lerp_(g, 1.0 - b1)
                exp_avg_sq[:c].mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (exp_avg_sq[:c].sqrt() / math.sqrt(1.0 - b2**step)).add_(ADAM_EPS)
                m.addcmul_(exp_avg[:c].div(denom), lr[:c], value=-1.0 / (1.0 - b1**step))
            else:
                if buf is not None:
                    if step == 1:
                        buf[:c] = g
                    else:
                        buf[:c].mul_(s0.momentum).add_(g)
                    g = buf[:c]
                m.addcmul_(g, lr[:c], value=-1.0)


# ------------------------------------------------------------------------------------------------ the client's job
def execute_batched(
    model: nn.Module,
    jobs: Sequence[tuple[Mapping[str, Mapping[str, np.ndarray]], Mapping[str, Any], Tensor, Tensor]],
    *,
    device: str | None = None,
    batch_clients: int = 0,
) -> list[tuple[dict[str, dict[str, np.ndarray]], dict[str, float | int]] | Exception]:
    """:func:`fedbayes.protocol.execute` for many clients at once: decode each message ``(records, config, x, y)``,
    train them batched (:func:`train_batched`), encode each reply.  A client whose message or training fails
    gets its exception in its place (the caller records it as a failed client); the others are unaffected."""
    from fedbayes.protocol import decode_job, encode_result

    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    todo: list[int] = []
    specs = []
    replies: list[str] = []
    out: list[Any] = [None] * len(jobs)
    for i, (records, config, x, y) in enumerate(jobs):
        try:
            task, settings, reply = decode_job(shapes, records, config, device)
        except ValueError as e:
            out[i] = e
            continue
        todo.append(i)
        specs.append((task.prior, x, y, settings, task.start_mean, task.start_prec))
        replies.append(reply)
    for i, res, reply in zip(todo, train_batched(model, specs, batch_clients=batch_clients), replies, strict=True):
        if isinstance(res, Exception):
            out[i] = res
            continue
        try:
            out[i] = encode_result(res, reply)
        except ValueError as e:
            out[i] = e
    return out
