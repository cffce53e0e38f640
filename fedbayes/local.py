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

Models: any ``nn.Module`` whose learnable state is its parameters (linear, convolutional, embedding layers,
LayerNorm/GroupNorm; any parameter shapes, any input shape): everything here works per named parameter.  State
outside the parameters is not federated (never sent, averaged or checkpointed), so a model whose buffers change
in training would let each client's copy drift silently.  Two guards, the same for the sequential and the batched
clients: :func:`check_stateless` refuses, before any training, a normalisation layer that tracks running
statistics (BatchNorm, or InstanceNorm with ``track_running_stats``), naming the module and suggesting
``nn.GroupNorm``; other buffers are allowed as constants (e.g. a fixed mask), and the sequential trainer raises
:class:`StatefulModelError` if one changed during training (the batched clients refuse models with buffers:
:func:`fedbayes.batched.check_batchable`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from fedbayes.curvature import diag_ggn
from fedbayes.gaussian import DiagGaussian, check_same_layout
from fedbayes.ivon import IVON, site_eta, split_natural
from fedbayes.keys import kebab
from fedbayes.optim import SGD, Adam, FlatOptimizer

__all__ = [
    "MODES", "RULE_KEYS", "USER_KEYS", "WIRE_KEYS", "LocalResult", "LocalSettings", "StatefulModelError",
    "check_stateless", "initial_curvature", "laplace_site", "train_local",
]

IVON_BETA2 = 0.9999
ADAM_BETA2 = 0.999


Mode = Literal["ivon", "adam", "sgd", "lbfgs"]
Loss = Literal["ce", "gaussian"]
MODES: tuple[str, ...] = get_args(Mode)
LOSSES: tuple[str, ...] = get_args(Loss)


class LocalSettings(BaseModel):
    """Local-training settings a server rule asks for: **the one schema** of fedbayes' local keys.

    Everything else is generated from this model (:mod:`fedbayes.config`): the optional local keys of
    ``RunConfig`` (same names, types and bounds, default None: "the rule's default"), hence the Flower
    run config and ``config.json``, and the wire codec (:meth:`to_wire` / :meth:`from_wire`, the kebab-case
    ConfigRecord a client receives).  Fields listed in :data:`RULE_KEYS` are set by the server rule or the engine
    (e.g. bayes-admm's ``ess-scale``), never by the user.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=kebab, populate_by_name=True)

    mode: Mode = "ivon"
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0.0, allow_inf_nan=False)
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    ess_scale: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    mc_samples: int = Field(1, ge=1)
    antithetic: bool = False
    hess_init: float = Field(0.1, gt=0.0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(IVON_BETA2, ge=0.0, lt=1.0)
    """Unset: per mode, IVON 0.9999 and Adam 0.999 (torch's default, what the baselines' papers use)."""
    clip_radius: float = Field(math.inf, gt=0.0)
    laplace: bool = False
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(0.0, ge=0.0)
    max_steps: int = Field(0, ge=0)
    prior_per_example: bool = False
    signed_site: bool = False
    """IVON: send s̃ = ess·h unclamped (bayes-admm); default: clamp s̃ ≥ 0 (PVI sites never remove evidence)."""
    loss: Loss = "ce"
    noise_var: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)
    device: str = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _beta2_per_mode(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("beta2") is None:
            return {**data, "beta2": ADAM_BETA2 if data.get("mode") == "adam" else IVON_BETA2}
        return data

    def to_wire(self) -> dict[str, Any]:
        """The settings as a flat kebab-case dict of scalars (a Flower ConfigRecord)."""
        return self.model_dump(by_alias=True)

    @classmethod
    def from_wire(cls, cfg: Mapping[str, Any], device: str | None = None) -> LocalSettings:
        """Inverse of :meth:`to_wire`; other keys of the message's config (``reply``, ``round`` …) are ignored.

        Raises ``ValueError`` naming each bad key."""
        kw = {key: cfg[key] for key in WIRE_KEYS if key in cfg}
        if device is not None:
            kw["device"] = device
        try:
            return cls.model_validate(kw)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']} (got {x.get('input')!r})"
                            for x in e.errors())
            raise ValueError(f"invalid local settings: {bad}") from None


RULE_KEYS = frozenset({"ess_scale", "prior_per_example", "signed_site", "seed", "device"})
"""Local settings chosen by the server rule or the engine, not run keys a user sets."""
USER_KEYS: tuple[str, ...] = tuple(n for n in LocalSettings.model_fields if n not in RULE_KEYS)
"""The local settings a user sets (run keys, default None = the rule's choice), in schema order."""
WIRE_KEYS: tuple[str, ...] = tuple(kebab(n) for n in LocalSettings.model_fields)


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


class StatefulModelError(ValueError):
    """The model keeps state outside its parameters that changes in training (the message names the module)."""


def _module_label(name: str, mod: nn.Module) -> str:
    return f"module '{name}' ({type(mod).__name__})" if name else f"the model itself ({type(mod).__name__})"


def check_stateless(model: nn.Module) -> None:
    """Refuse, before any training, a model with normalisation layers that track running statistics.

    Raises
    ------
    StatefulModelError
        Naming the first such module by its dotted name and class, and suggesting ``nn.GroupNorm``.
    """
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            bufs = [b for b, _ in mod.named_buffers(recurse=False)]
            raise StatefulModelError(
                f"{_module_label(name, mod)} keeps running statistics (buffers {bufs}) that change in training; "
                "fedbayes federates a model's parameters only, so they would be neither sent, aggregated nor "
                f"checkpointed. Replace it with nn.GroupNorm (e.g. nn.GroupNorm(2, {mod.num_features})) or "
                "nn.LayerNorm, which keep no running statistics"
            )


def _buffer_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def _check_buffers_unchanged(model: nn.Module, before: Mapping[str, Tensor]) -> None:
    if not before:
        return
    owners = dict(model.named_modules())
    for k, b in model.named_buffers():
        if k in before and not torch.equal(before[k].to(b.device), b.detach()):
            mod_name = k.rpartition(".")[0]
            raise StatefulModelError(
                f"buffer '{k}' of {_module_label(mod_name, owners[mod_name])} changed during local training; "
                "fedbayes federates parameters only (buffers are neither sent, aggregated nor checkpointed): make "
                "it a parameter, or use a layer without state (e.g. nn.GroupNorm instead of BatchNorm)"
            )


def _check_data(x: Tensor | TorchDataset, y: Tensor | None) -> None:
    if not isinstance(x, Tensor):  # a map-style Dataset of (x, y) pairs: its batches are checked as they come
        if y is not None:
            raise ValueError("local data: a Dataset holds its own targets; pass y=None")
        if len(x) == 0:  # type: ignore[arg-type]
            raise ValueError("local data is empty: a client needs at least one example")
        return
    if y is None:
        raise ValueError("local data: tensors x need their targets y")
    if x.shape[0] == 0:
        raise ValueError("local data is empty: a client needs at least one example")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"local data: {x.shape[0]} inputs but {y.shape[0]} targets")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("local data: inputs contain NaN or Inf")


@dataclass
class _Fit:
    """One call's working set: the model's parameters, the prior split for float32 arithmetic, the data on the
    device, ess, the loss and the seeded batch order (drawn in the same order on every path)."""

    model: nn.Module
    named: dict[str, nn.Parameter]
    prior: DiagGaussian
    centers: dict[str, Tensor]
    lins: dict[str, Tensor]
    precs: dict[str, Tensor]
    x: Tensor
    y: Tensor
    n: int
    ess: float
    settings: LocalSettings
    device: torch.device
    dtype: torch.dtype
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch_gen: torch.Generator
    source: TorchDataset | None = None
    """A map-style Dataset (then ``x``/``y`` are read from it only where the whole set is needed: L-BFGS, the
    Laplace site); None: the tensors ``x``, ``y``."""
    loss_sum: Tensor | float = 0.0
    """Summed minibatch losses, kept on the device (a float64 tensor): no host sync per step."""
    loss_count: int = 0
    steps: int = 0

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The minibatches (x, y): one ``randperm`` per epoch, the epoch's data gathered once in that order and
        cut into views (one gather per epoch instead of one per step).  A Dataset goes through a ``DataLoader``
        whose batches are that same permutation cut in the same places, so it trains as the equal tensors do."""
        b = min(self.settings.batch_size, self.n)
        if self.source is not None:
            from torch.utils.data import DataLoader

            for _ in range(self.settings.epochs):
                order = torch.randperm(self.n, generator=self.batch_gen).tolist()
                cuts = [order[i : i + b] for i in range(0, self.n, b)]
                for xb, yb in DataLoader(self.source, batch_sampler=cuts, num_workers=0):
                    yield self.cast(xb, yb)
            return
        for _ in range(self.settings.epochs):
            perm = torch.randperm(self.n, generator=self.batch_gen).to(self.device)
            xe, ye = self.x.index_select(0, perm), self.y.index_select(0, perm)  # 3-4x faster than x[perm] on a CPU
            for i in range(0, self.n, b):
                yield xe[i : i + b], ye[i : i + b]

    def cast(self, x: Tensor, y: Any) -> tuple[Tensor, Tensor]:
        """A batch on the device: floating inputs in the model's dtype, targets as the loss takes them."""
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = torch.as_tensor(y).to(self.device)
        return x, (y.long() if self.settings.loss == "ce" else y.to(self.dtype))

    def full(self) -> tuple[Tensor, Tensor]:
        """All of the client's examples at once (a Dataset read once, in order, through its transforms)."""
        if self.source is not None and self.x.numel() == 0:
            from fedbayes.data.user import as_tensors

            self.x, self.y = self.cast(*as_tensors(self.source))
        return self.x, self.y

    def planned_steps(self) -> int:
        """The number of steps :meth:`batches` and :meth:`done` allow: epochs × ⌈n/b⌉, capped by max-steps."""
        b = min(self.settings.batch_size, self.n)
        steps = self.settings.epochs * -(-self.n // b)
        return min(steps, self.settings.max_steps) if self.settings.max_steps else steps

    def done(self) -> bool:
        """Count a step; True once ``max_steps`` is reached."""
        self.steps += 1
        return bool(self.settings.max_steps) and self.steps >= self.settings.max_steps


def _prepare(model: nn.Module, prior: DiagGaussian, x: Tensor | TorchDataset, y: Tensor | None,
             settings: LocalSettings, start_mean: Mapping[str, Tensor] | None) -> _Fit:
    _check_data(x, y)
    device = torch.device(settings.device)
    model.to(device)
    named = dict(model.named_parameters())
    prior.validate(named, min_prec=None, what="prior")
    dtype = next(iter(named.values())).dtype
    n = int(x.shape[0]) if isinstance(x, Tensor) else len(x)  # type: ignore[arg-type]
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
    source = None
    if isinstance(x, Tensor):
        assert y is not None
        x, y = x.to(device), y.to(device)
        y = y.long() if settings.loss == "ce" else y.to(dtype)
    else:
        source, x, y = x, torch.empty(0), torch.empty(0)
    # Randomness comes from explicit generators seeded by settings.seed (batch order, IVON noise); the global CPU
    # generator is seeded too for stochastic layers.  (torch.manual_seed would also queue a lazy CUDA seeding
    # that records a stack trace: ~2.6 ms per call, a third of a small client's training time.)
    torch.default_generator.manual_seed(settings.seed)
    batch_gen = torch.Generator().manual_seed(settings.seed)
    return _Fit(model, named, prior, centers, lins, precs, x, y, n, ess, settings, device, dtype,
                _loss_fn(settings), batch_gen, source)


def _fit_ivon(f: _Fit, start_prec: Mapping[str, Tensor] | None) -> tuple[DiagGaussian, dict[str, float]]:
    """IVON under the prior from the warm start (:func:`initial_curvature`); the site s̃ = ess·h (signed or
    clamped at 0), η̃ = s̃ ⊙ m + s_π ⊙ m − η_π (:meth:`fedbayes.ivon.IVON.site`)."""
    s, named = f.settings, f.named
    noise_gen = torch.Generator(device=f.device).manual_seed(s.seed + 1)
    opt = IVON(list(named.values()), lr=s.lr, ess=f.ess, hess_init=s.hess_init, beta1=s.beta1,
               beta2=float(s.beta2 or IVON_BETA2), weight_decay=0.0, mc_samples=s.mc_samples,
               clip_radius=s.clip_radius, antithetic=s.antithetic, generator=noise_gen)
    opt.set_prior([f.prior.eta[k] for k in named], [f.prior.prec[k] for k in named])
    opt.set_hess(initial_curvature({k: f.prior.prec[k] for k in named}, f.ess, s.hess_init, start_prec,
                                   device=f.device, dtype=f.dtype))
    opt.plan_draws(f.planned_steps() * opt.draws_per_step())  # noise drawn one step ahead (fedbayes.noise)
    for xb, yb in f.batches():
        for _ in range(s.mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad(set_to_none=True)
                loss = f.loss_fn(f.model(xb), yb)
                loss.backward()
            f.loss_sum = f.loss_sum + loss.detach().double()
            f.loss_count += 1
        opt.step()
        if f.done():
            break
    clamped = 0 if s.signed_site else sum(int((g["hess"] < 0).sum()) for g in opt.param_groups)
    etas, sprecs = opt.site(signed=s.signed_site)
    site = DiagGaussian(dict(zip(named, etas, strict=True)), dict(zip(named, sprecs, strict=True)))
    return site, {"site_clamped": float(clamped)}


def _fit_point(f: _Fit) -> None:
    """θ = argmin ℓ̄(θ) + [½ Σ s_π(θ − c)² − r·θ]/ess by Adam, SGD or (full batch) L-BFGS."""
    s, named = f.settings, f.named
    neg = [k for k in named if bool((f.precs[k] < 0).any())]
    if neg:
        raise ValueError(
            f"point mode '{s.mode}' got a prior with negative precision in {neg[:3]}: the local objective "
            "is unbounded below (an ADMM factor such as bayes-admm's needs mode=ivon)"
        )

    has_prior = any(bool(f.precs[k].any()) or bool(f.lins[k].any()) for k in named)

    def penalty() -> Tensor | float:
        """[½ Σ s_π(θ − c)² − r·θ]/ess; exactly 0 (and skipped: two passes over P and their backward) for a flat
        prior (FedAvg)."""
        if not has_prior:
            return 0.0
        tot = torch.zeros((), device=f.device, dtype=f.dtype)
        for k, p in named.items():
            tot = tot + 0.5 * (f.precs[k] * (p - f.centers[k]) ** 2).sum() - (f.lins[k] * p).sum()
        return tot / f.ess

    params = list(named.values())
    if s.mode == "lbfgs":
        opt_l = torch.optim.LBFGS(params, lr=s.lr, max_iter=max(20, s.max_steps or 500),
                                  tolerance_grad=1e-14, tolerance_change=0.0, history_size=50,
                                  line_search_fn="strong_wolfe")

        x_all, y_all = f.full()

        def closure() -> Tensor:
            opt_l.zero_grad(set_to_none=True)
            total = f.loss_fn(f.model(x_all), y_all) + penalty()
            total.backward()
            return total

        for _ in range(s.epochs):
            f.loss_sum += float(opt_l.step(closure).detach())  # type: ignore[union-attr]
            f.loss_count += 1
            f.steps += 1
        return
    opt_p: FlatOptimizer
    if s.mode == "adam":
        opt_p = Adam(params, lr=s.lr, betas=(s.beta1, float(s.beta2 or ADAM_BETA2)))
    else:
        opt_p = SGD(params, lr=s.lr, momentum=s.momentum)
    for xb, yb in f.batches():
        opt_p.zero_grad(set_to_none=True)
        data_loss = f.loss_fn(f.model(xb), yb)
        (data_loss + penalty()).backward()
        if s.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt_p.step()
        f.loss_sum = f.loss_sum + data_loss.detach().double()
        f.loss_count += 1
        if f.done():
            break


def laplace_site(model: nn.Module, named: Mapping[str, Tensor], prior: DiagGaussian, x: Tensor, ess: float,
                 loss: str, noise_var: float) -> DiagGaussian:
    """The Laplace site at the model's weights θ: s̃ = H = ess·GGN(ℓ̄) = GGN(Σℓ)/(τρ), η̃ = H ⊙ θ + s_π ⊙ (θ − c)
    − r, in float64 (s_π(θ − c) keeps the digits of the prior); ``prior`` is the one the client trained under."""
    ggn = diag_ggn(model, named, x, loss, noise_var)
    n = int(x.shape[0])
    with torch.no_grad():
        s_site = {k: ggn[k].double() * (ess / n) for k in named}
        e_site = {}
        for k, p in named.items():
            c64, r64 = split_natural(prior.eta[k], prior.prec[k])
            th = p.detach().double()
            s_pi = prior.prec[k].double().to(th.device)
            e_site[k] = site_eta(s_site[k], th, s_pi, c64.to(th.device), r64.to(th.device))
    return DiagGaussian(e_site, s_site)


def train_local(
    model: nn.Module,
    prior: DiagGaussian,
    x: Tensor | TorchDataset,
    y: Tensor | None,
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
        The client's data: tensors (x of shape (N, …), y of shape (N,)), or a map-style torch ``Dataset`` of
        (x, y) pairs as ``x`` with ``y=None`` (batches through a ``DataLoader`` in the same seeded order:
        :meth:`_Fit.batches`; Nₖ = ``len(x)``).
    settings
        See :class:`LocalSettings`.
    start_mean, start_prec
        Warm start.  In IVON mode the data curvature starts exactly at the start precision when one is given,
        h₀ = (start_prec − s_π)/ess (see :func:`initial_curvature`; no floor), else at ``hess_init``.  With
        ``settings.prior_per_example`` the prior is given per example and multiplied by ess here
        (FedProx/FedADMM/FedDyn put their penalties on the mean loss).
    """
    t0 = time.perf_counter()
    check_stateless(model)
    buffers = _buffer_snapshot(model)
    f = _prepare(model, prior, x, y, settings, start_mean)
    site: DiagGaussian | None = None
    extra: dict[str, float] = {}
    if settings.mode == "ivon":
        site, extra = _fit_ivon(f, start_prec)
    else:
        _fit_point(f)
        if settings.laplace:
            site = laplace_site(f.model, f.named, f.prior, f.full()[0], f.ess, settings.loss, settings.noise_var)
    _check_buffers_unchanged(f.model, buffers)
    for k, p in f.named.items():
        if not bool(torch.isfinite(p).all()):
            raise FloatingPointError(f"local training diverged: parameter '{k}' is not finite (lower lr?)")
    mean = {k: p.detach().to("cpu").clone() for k, p in f.named.items()}
    metrics = {
        "train_loss": float(f.loss_sum) / max(f.loss_count, 1),
        "steps": float(f.steps),
        "train_seconds": time.perf_counter() - t0,
        **extra,
    }
    return LocalResult(mean=mean, site=None if site is None else site.to(device="cpu"), num_examples=f.n,
                       metrics=metrics)
