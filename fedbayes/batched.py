"""Batched clients: the participants of a round train as one model whose parameters carry a leading client axis.

The local problem of every client is exactly :func:`fedbayes.local.train_local`'s (same prior, warm start, ess,
learning rate, minibatch order and IVON noise); only the arithmetic is shared.  C clients' means live in one
(C, P) buffer M, every optimiser state (IVON's h and momentum, Adam's moments, SGD's buffer) in buffers of the
same shape, and one step is

    θ = M + ε / √(ess·(h + δ))                      (IVON; θ = M for Adam/SGD)
    out_k = f(θ_k, x_k)                              (:func:`stacked_forward`: baddbmm over k, or vmap)
    g = ∂/∂θ Σ_k ℓ̄_k(θ_k)                            (one backward: client k's loss depends on θ_k only)

followed by the element-wise update of IVON, Adam or SGD: the functions of :mod:`fedbayes.updates`, the same the
sequential optimisers call, given (C, P) buffers and per-client ess, learning rate and prior.

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
are not batched (:func:`check_batchable` says why; it, the stacked forward and the chunking: :mod:`fedbayes.stacked`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedbayes import updates as U
from fedbayes.gaussian import DiagGaussian
from fedbayes.ivon import split_natural
from fedbayes.local import (
    ADAM_BETA2,
    IVON_BETA2,
    LocalResult,
    LocalSettings,
    _check_data,
    initial_curvature,
    laplace_site,
)
from fedbayes.noise import ahead_enabled, run_ahead
from fedbayes.stacked import (
    CPU_CHUNK_BYTES,
    Unbatchable,
    check_batchable,
    chunk_size,
    client_bytes,
    model_client_bytes,
    stacked_forward,
)

__all__ = [
    "BATCHED_MODES", "CPU_CHUNK_BYTES", "Unbatchable", "check_batchable", "chunk_size", "client_bytes",
    "execute_batched", "model_client_bytes", "stacked_forward", "train_batched",
]

BATCHED_MODES = ("ivon", "adam", "sgd")
ADAM_EPS = 1e-8
"""Adam's ε, torch's default, as :class:`fedbayes.optim.Adam`."""


def _group_key(s: LocalSettings) -> tuple[Any, ...]:
    """Settings that must agree within one batch (the rest, lr, ess, seed, epochs, max-steps, hess-init, may differ
    per client)."""
    return (s.mode, s.batch_size, s.mc_samples, s.antithetic, s.beta1, s.beta2, s.clip_radius, s.laplace,
            s.momentum, s.grad_clip, s.prior_per_example, s.signed_site, s.loss, s.noise_var, s.device)


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


def _unflat(flat: Tensor, names: Sequence[str], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One client's flat vector as named tensors of ``like``'s shapes, on the CPU."""
    out, i = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = flat[i : i + n].view(like[k].shape).cpu().clone()
        i += n
    return out


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
    has_lin = bool(lin.any())  # a linear prior term only where a prior precision is 0: usually none
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
            losses, g = loss_and_grad(U.ivon_sample(m, eps, inv_sigma[:c], out=theta_buf[:c]), t, c)
            if S > 1:
                g = g.clone()  # the gradient buffer is reused by the next sample
            loss_sum[:c] += losses.double()
            # ĥ's sample into the running mean's buffer (first sample) or scratch (later ones), as IVON does
            gx = U.price_hess_sample(g, eps, inv_sigma[:c], out=(hh_buf if smp == 0 else tmp)[:c])
            if smp == 0:
                g_avg, hh_avg = g, gx
            else:
                assert g_avg is not None and hh_avg is not None
                U.running_mean_(g_avg, g, smp)
                U.running_mean_(hh_avg, gx, smp)
        assert g_avg is not None and hh_avg is not None
        with torch.no_grad():
            U.ivon_step_(m, h, mom[:c], hd[:c], inv_sigma[:c], g_avg, hh_avg, delta[:c], ess=ess[:c], lr=lr[:c],
                       beta1=b1, beta2=b2, debias=1.0 - b1 ** (t + 1), clip=clip, center=center[:c],
                       lin=lin[:c] if has_lin else None, tmp=tmp[:c])
    for j, cl in enumerate(chunk):
        extra[j]["site_clamped"] = 0.0 if cl.settings.signed_site else float(int((hess[j] < 0).sum()))

    def site(j: int) -> DiagGaussian:
        """IVON's site (:func:`fedbayes.updates.ivon_site`, as :meth:`fedbayes.ivon.IVON.site`) of client j."""
        cl = chunk[j]
        e64 = torch.cat([cl.prior.eta[k].reshape(-1).double() for k in names]).to(device)
        s_pi = torch.cat([cl.prior.prec[k].reshape(-1).double() for k in names]).to(device)
        eta, s_site = U.ivon_site(cl.ess, hess[j], M[j], s_pi, *split_natural(e64, s_pi),
                                  signed=cl.settings.signed_site)
        return DiagGaussian(_unflat(eta, names, cl.prior.prec), _unflat(s_site, names, cl.prior.prec))

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
    denom = torch.empty_like(M)
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
            if adam:
                assert exp_avg is not None and exp_avg_sq is not None
                U.adam_step_(m, exp_avg[:c], exp_avg_sq[:c], g, denom[:c], lr=lr[:c], beta1=b1, beta2=b2, step=t + 1,
                           eps=ADAM_EPS)
            else:
                if buf is not None:
                    g = U.heavy_ball_(buf[:c], g, s0.momentum, first=t == 0)
                U.sgd_step_(m, g, lr[:c])


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
