"""The one local trainer: fit a client's data under the Gaussian prior the server sent.

For client k with Nₖ examples, temperature τ, an algorithm-chosen scale ρ (``ess_scale``; 1 except for
bayes-admm) and prior π = N(m_π, diag(1/s_π)) given as natural parameters (η_π, s_π), let ess = Nₖ/(τρ)
and ℓ̄ the mean per-example loss:

* ``mode="ivon"`` — q = argmin_q ess·E_q[ℓ̄(θ)] + KL(q ‖ π), solved by :class:`fedbayes.ivon.IVON`;
  site s̃ = ess·h, η̃ = ess·h ⊙ m + s_π ⊙ (m − m_π).
* ``mode in {"adam", "sgd", "lbfgs"}`` (point / delta method) — θ = argmin ess·ℓ̄(θ) + ½ Σ s_π(θ − m_π)²
  (a linear term where s_π = 0); with ``laplace=True`` a diagonal GGN H = ess·GGN(ℓ̄) at θ gives the site
  s̃ = H, η̃ = H ⊙ θ + s_π ⊙ (θ − m_π).  ``lbfgs`` is full-batch and meant as an exact solver for small
  convex problems (tests, conjugate checks).

s_π = 0 is plain local training (FedAvg).  Point modes optimise the objective divided by ess, i.e. the mean
loss plus the prior term / ess, so that learning rates keep their usual meaning.  Clients hold no state
between rounds: optimiser moments start fresh each call and everything that persists lives on the server.

Losses: cross-entropy (``loss="ce"``) and a Gaussian likelihood with noise variance σ² (``loss="gaussian"``,
ℓ = (y − f)²/(2σ²)).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from fedbayes.gaussian import DiagGaussian, check_same_layout
from fedbayes.ivon import IVON, split_natural
from fedbayes.optim import SGD, Adam, FlatOptimizer

__all__ = ["MODES", "LocalResult", "LocalSettings", "diag_ggn", "initial_curvature", "train_local"]

MODES = ("ivon", "adam", "sgd", "lbfgs")
IVON_BETA2 = 0.9999
ADAM_BETA2 = 0.999
LOSSES = ("ce", "gaussian")


@dataclass(frozen=True)
class LocalSettings:
    """Local-training settings a server rule asks for (mirrored by the Flower ConfigRecord)."""

    mode: str = "ivon"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    temperature: float = 1.0
    ess_scale: float = 1.0
    mc_samples: int = 1
    antithetic: bool = False
    hess_init: float = 0.1
    beta1: float = 0.9
    beta2: float | None = None
    """None: per mode, IVON 0.9999 and Adam 0.999 (torch's default, what the baselines' papers use)."""
    clip_radius: float = math.inf
    laplace: bool = False
    momentum: float = 0.0
    grad_clip: float = 0.0
    max_steps: int = 0
    prior_per_example: bool = False
    signed_site: bool = False
    """IVON: send s̃ = ess·h unclamped (bayes-admm); default: clamp s̃ ≥ 0 (PVI sites never remove evidence)."""
    loss: str = "ce"
    noise_var: float = 1.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.beta2 is None:
            object.__setattr__(self, "beta2", ADAM_BETA2 if self.mode == "adam" else IVON_BETA2)
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        for name in ("lr", "temperature", "ess_scale", "noise_var", "hess_init"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                problems.append(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("epochs", "batch_size", "mc_samples"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "momentum"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.max_steps < 0 or self.grad_clip < 0 or not self.clip_radius > 0:
            problems.append("max_steps and grad_clip must be >= 0 and clip_radius > 0")
        if problems:
            raise ValueError("invalid local settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class LocalResult:
    """What a client reports: its mean, its site (IVON or Laplace), Nₖ and training metrics."""

    mean: dict[str, Tensor]
    site: DiagGaussian | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _loss_fn(settings: LocalSettings):  # type: ignore[no-untyped-def]
    if settings.loss == "ce":
        return lambda out, y: nn.functional.cross_entropy(out, y)
    nv = settings.noise_var
    return lambda out, y: ((out.reshape(-1) - y.reshape(-1)) ** 2).mean() / (2 * nv)


def _linear_layers(model: nn.Module) -> list[nn.Linear] | None:
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
    layers = _linear_layers(model)
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


def initial_curvature(
    prior_prec: Mapping[str, Tensor],
    ess: float,
    hess_init: float,
    start_prec: Mapping[str, Tensor] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """IVON's starting data curvature h₀, one tensor per parameter.

    * A start precision S is given (the server's posterior: every round after the first): h₀ = (S − s_π)/ess
      **exactly**, so the client starts at the server's posterior, ess·(h₀ + δ) = S with δ = s_π/ess.  No
      floor: a floor adds ess·floor of made-up precision to every coordinate of the site (with ess = Nₖ/(τρ)
      ≈ 10⁵–10⁶ that held hidden layers 10²–10⁴ times too stiffly and cost bayes-admm 4–5 points).  h₀ may
      be negative (a prior stiffer than the posterior, e.g. an ADMM dual); what IVON needs is h₀ + δ > 0,
      i.e. S > 0, which the servers guarantee (global precisions are floored at ``min-prec``) and which is
      checked here.
    * No start precision (round 1, or a rule that sends none): h₀ = hess_init + max(0, −s_π/ess), so that
      h₀ + δ ≥ hess_init > 0 even under a prior of negative precision.

    This is how the reference resets IVON from the global posterior every round (h restarts from the global,
    ``hess_init`` is used in round 1 only).
    """
    out = []
    for k, s_pi in prior_prec.items():
        s_pi = s_pi.to(device=device, dtype=torch.float64)
        if start_prec is None:
            h = hess_init + (-s_pi / ess).clamp_min(0.0)
        else:
            s = start_prec[k].to(device=device, dtype=torch.float64)
            if not bool((s > 0).all()):
                raise ValueError(f"start precision of '{k}' must be > 0 (min {float(s.min()):.3g})")
            h = (s - s_pi) / ess
        out.append(h.to(dtype))
    return out


def _check_data(x: Tensor, y: Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError("local data is empty: a client needs at least one example")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"local data: {x.shape[0]} inputs but {y.shape[0]} targets")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("local data: inputs contain NaN or Inf")


def train_local(
    model: nn.Module,
    prior: DiagGaussian,
    x: Tensor,
    y: Tensor,
    settings: LocalSettings,
    *,
    start_mean: Mapping[str, Tensor] | None = None,
    start_prec: Mapping[str, Tensor] | None = None,
) -> LocalResult:
    """Fit ``(x, y)`` under ``prior``; return the local mean, the site, Nₖ and metrics.

    Parameters
    ----------
    model
        The architecture; its parameters are overwritten (start point: ``start_mean`` or its current weights).
    prior
        π as natural parameters (any dtype; zero precision = no prior), names/shapes of ``model``.
    x, y
        The client's data.
    settings
        See :class:`LocalSettings`.
    start_mean, start_prec
        Warm start.  In IVON mode the data curvature starts exactly at the start precision when one is given,
        h₀ = (start_prec − s_π)/ess (see :func:`initial_curvature`; no floor), else at ``hess_init``.  With
        ``settings.prior_per_example`` the prior is given per example and multiplied by ess here
        (FedProx/FedADMM/FedDyn put their penalties on the mean loss).
    """
    t0 = time.perf_counter()
    _check_data(x, y)
    device = torch.device(settings.device)
    model.to(device)
    named = dict(model.named_parameters())
    prior.validate(named, min_prec=None, what="prior")
    dtype = next(iter(named.values())).dtype
    n = int(x.shape[0])
    ess = n / (settings.temperature * settings.ess_scale)
    if settings.prior_per_example:
        prior = prior.scale(ess)
    with torch.no_grad():
        if start_mean is not None:
            check_same_layout(named, start_mean, "start_mean")
            for k, p in named.items():
                p.copy_(start_mean[k].to(device=device, dtype=dtype))
    centers, lins, precs = {}, {}, {}
    for k in named:
        c, r = split_natural(prior.eta[k], prior.prec[k])
        centers[k], lins[k] = c.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)
        precs[k] = prior.prec[k].to(device=device, dtype=dtype)
    x, y = x.to(device), y.to(device)
    if settings.loss == "ce":
        y = y.long()
    else:
        y = y.to(dtype)
    loss_fn = _loss_fn(settings)
    # Randomness comes from explicit generators seeded by settings.seed (batch order, IVON noise); the global CPU
    # generator is seeded too for stochastic layers.  (torch.manual_seed would also queue a lazy CUDA seeding
    # that records a stack trace: ~2.6 ms per call, a third of a small client's training time.)
    torch.default_generator.manual_seed(settings.seed)
    batch_gen = torch.Generator().manual_seed(settings.seed)
    params = list(named.values())
    steps, loss_sum, loss_count = 0, 0.0, 0
    max_steps = settings.max_steps or None

    def batches():  # type: ignore[no-untyped-def]
        b = min(settings.batch_size, n)
        for _ in range(settings.epochs):
            perm = torch.randperm(n, generator=batch_gen).to(device)
            for i in range(0, n, b):
                yield perm[i : i + b]

    site: DiagGaussian | None = None
    extra_metrics: dict[str, float] = {}
    if settings.mode == "ivon":
        noise_gen = torch.Generator(device=device).manual_seed(settings.seed + 1)
        opt = IVON(params, lr=settings.lr, ess=ess, hess_init=settings.hess_init, beta1=settings.beta1,
                   beta2=float(settings.beta2 or IVON_BETA2), weight_decay=0.0, mc_samples=settings.mc_samples,
                   clip_radius=settings.clip_radius, antithetic=settings.antithetic, generator=noise_gen)
        opt.set_prior([prior.eta[k] for k in named], [prior.prec[k] for k in named])
        h0 = initial_curvature({k: prior.prec[k] for k in named}, ess, settings.hess_init, start_prec,
                               device=device, dtype=dtype)
        opt.set_hess(h0)
        for idx in batches():
            xb, yb = x[idx], y[idx]
            for _ in range(settings.mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                loss_sum += float(loss.detach())
                loss_count += 1
            opt.step()
            steps += 1
            if max_steps and steps >= max_steps:
                break
        clamped = 0 if settings.signed_site else sum(int((g["hess"] < 0).sum()) for g in opt.param_groups)
        etas, sprecs = opt.site(signed=settings.signed_site)
        site = DiagGaussian(dict(zip(named, etas, strict=True)), dict(zip(named, sprecs, strict=True)))
        extra_metrics["site_clamped"] = float(clamped)
    else:
        neg = [k for k in named if bool((precs[k] < 0).any())]
        if neg:
            raise ValueError(
                f"point mode '{settings.mode}' got a prior with negative precision in {neg[:3]}: the local objective "
                "is unbounded below (an ADMM factor such as bayes-admm's needs mode=ivon)"
            )

        def penalty() -> Tensor:
            tot = torch.zeros((), device=device, dtype=dtype)
            for k, p in named.items():
                tot = tot + 0.5 * (precs[k] * (p - centers[k]) ** 2).sum() - (lins[k] * p).sum()
            return tot / ess

        if settings.mode == "lbfgs":
            opt_l = torch.optim.LBFGS(params, lr=settings.lr, max_iter=max(20, settings.max_steps or 500),
                                      tolerance_grad=1e-14, tolerance_change=0.0, history_size=50,
                                      line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt_l.zero_grad(set_to_none=True)
                total = loss_fn(model(x), y) + penalty()
                total.backward()
                return total

            for _ in range(settings.epochs):
                loss_sum += float(opt_l.step(closure).detach())  # type: ignore[union-attr]
                loss_count += 1
                steps += 1
        else:
            opt_p: FlatOptimizer
            if settings.mode == "adam":
                opt_p = Adam(params, lr=settings.lr, betas=(settings.beta1, float(settings.beta2 or ADAM_BETA2)))
            else:
                opt_p = SGD(params, lr=settings.lr, momentum=settings.momentum)
            for idx in batches():
                opt_p.zero_grad(set_to_none=True)
                data_loss = loss_fn(model(x[idx]), y[idx])
                (data_loss + penalty()).backward()
                if settings.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt_p.step()
                loss_sum += float(data_loss.detach())
                loss_count += 1
                steps += 1
                if max_steps and steps >= max_steps:
                    break
        if settings.laplace:
            ggn = diag_ggn(model, named, x, settings.loss, settings.noise_var)
            with torch.no_grad():  # in float64: s_π(θ − m_π) keeps the digits of the prior
                s_site = {k: ggn[k].double() * (ess / n) for k in named}  # H = ess·GGN(ℓ̄) = GGN(Σℓ)/(τρ)
                e_site = {}
                for k, p in named.items():
                    c64, r64 = split_natural(prior.eta[k], prior.prec[k])
                    th = p.detach().double()
                    s_pi = prior.prec[k].double().to(th.device)
                    e_site[k] = s_site[k] * th + s_pi * (th - c64.to(th.device)) - r64.to(th.device)
            site = DiagGaussian(e_site, s_site)
    for k, p in named.items():
        if not bool(torch.isfinite(p).all()):
            raise FloatingPointError(f"local training diverged: parameter '{k}' is not finite (lower lr?)")
    mean = {k: p.detach().to("cpu").clone() for k, p in named.items()}
    if site is not None:
        site = site.to(device="cpu")
    metrics = {
        "train_loss": loss_sum / max(loss_count, 1),
        "steps": float(steps),
        "train_seconds": time.perf_counter() - t0,
        **extra_metrics,
    }
    return LocalResult(mean=mean, site=site, num_examples=n, metrics=metrics)
