"""What a batch of clients is, before any training: which models can be stacked over a client axis
(:func:`check_batchable`), the stacked forward f(θ_k, x_k) for every client k at once (:func:`stacked_forward`), and
how many clients fit in memory at once (:func:`chunk_size`).  The training itself is :mod:`fedbayes.batched`, which
re-exports these names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedbayes.local import check_stateless

__all__ = [
    "CPU_CHUNK_BYTES", "Unbatchable", "check_batchable", "chunk_size", "client_bytes", "model_client_bytes",
    "stacked_forward",
]


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
