"""IVON with a vector-mean, vector-precision Gaussian prior, written from its update equations.

IVON (Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024) fits a diagonal
Gaussian q = N(m, diag(1/Λ)) to the target

    q* = argmin_q  ess · E_q[ℓ̄(θ)] + KL(q ‖ π),        π = N(m_π, diag(1/s_π)),

where ℓ̄ is the mean minibatch loss and ``ess`` the effective sample size (Nₖ/τ for a client with Nₖ examples
at temperature τ).  The posterior precision is Λ = ess·(h + δ) with δ = s_π/ess, i.e. Λ = ess·h + s_π: h
carries only the data curvature and every known Gaussian factor sits in δ exactly (the cavity form of
``shared/reference/ivon.md`` §2; with m_π = 0 and s_π = ess·wd·1 it is ivon-opt's weight decay).

Per step t, with S Monte-Carlo samples (optionally antithetic pairs ε, −ε):

    σ = 1/√(ess·(h + δ)),  θ_s = m + σ ⊙ ε_s                               (sample)
    ḡ = mean_s ∇ℓ̄(θ_s),   ĥ = mean_s ∇ℓ̄(θ_s) ⊙ (θ_s − m) / σ²                (Price / reparameterisation)
    g ← β1 g + (1 − β1) ḡ
    h ← β2 h + (1 − β2) ĥ + ½(1 − β2)² (h − ĥ)² / (h + δ)                    (Riemannian correction)
    m ← m − α · clip((g/(1 − β1ᵗ) + δ ⊙ m − η_π/ess) / (h + δ), ±r)

where η_π = s_π ⊙ m_π (in code δ⊙(m − c) − r/ess, with the center c and linear part r of
:func:`split_natural`, which keeps float32 digits), so a prior of zero or negative precision is allowed
(an ADMM factor with a negative "precision" works as long as h + δ > 0 at the start; the correction term
keeps h + δ > 0 afterwards: h_new + δ ≥ (h + δ)/2).

The client's **site** (its posterior divided by the prior) is computed directly, never as a difference of
two large numbers:  s̃ = ess·h,  η̃ = ess·h ⊙ m + s_π ⊙ m − η_π.

Differences from ivon-opt 0.1.3 (which is only a test oracle here): vector prior mean/precision, natural
parameter get/set and warm start, antithetic sampling, the step counter is part of ``state_dict``, a
parameter that receives no gradient counts as a zero gradient, ``step()`` without samples raises a clear
error, and ``rescale_lr`` is off by default (with a vector δ a per-coordinate rescale makes no sense; when on,
the scalar factor hess_init + weight_decay is used, as in ivon-opt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from fedbayes.noise import ahead_enabled, run_ahead
from fedbayes.optim import FlatOptimizer
from fedbayes.updates import ivon_sample, ivon_site, ivon_step_, price_hess_sample, running_mean_, site_eta

__all__ = ["IVON", "site_eta", "split_natural"]


def split_natural(eta: Tensor, prec: Tensor) -> tuple[Tensor, Tensor]:
    """Write a factor exp(ηθ − ½sθ²) as ½s(θ − c)² − rθ: center c = η/s where s ≠ 0, linear part r = η
    where s = 0.  Done in float64 so that s·(θ − c) does not lose digits the way s·θ − η does."""
    e, s = eta.double(), prec.double()
    nz = s != 0
    center = torch.where(nz, e / torch.where(nz, s, torch.ones_like(s)), torch.zeros_like(e))
    lin = torch.where(nz, torch.zeros_like(e), e)
    return center, lin


class IVON(FlatOptimizer):
    """Improved Variational Online Newton with a diagonal Gaussian prior.

    Parameters
    ----------
    params
        Model parameters (or parameter groups).
    lr : float
        Step size α (> 0).
    ess : float
        Effective sample size (> 0); the data term is weighted by it.
    hess_init : float
        Initial data curvature h₀ (> 0 recommended; h + δ must be > 0).
    beta1, beta2 : float
        Momentum and curvature averaging constants in [0, 1).
    weight_decay : float
        Default isotropic zero-mean prior of precision ess·weight_decay, replaced by :meth:`set_prior`.
    mc_samples : int
        Samples per step (used by the caller's loop; stored for reference).
    clip_radius : float
        Element-wise clip of the preconditioned step.
    antithetic : bool
        Every second sample reuses −ε of the previous one.
    debias : bool
        Divide the momentum by 1 − β1ᵗ.
    rescale_lr : bool
        Multiply α by (hess_init + weight_decay), as ivon-opt does by default.
    generator : torch.Generator, optional
        Source of the Gaussian noise (the global RNG if None).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        clip_radius: float = math.inf,
        antithetic: bool = False,
        debias: bool = True,
        rescale_lr: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        checks = {
            "lr": lr > 0 and math.isfinite(lr),
            "ess": ess > 0 and math.isfinite(ess),
            "beta1": 0.0 <= beta1 < 1.0,
            "beta2": 0.0 <= beta2 < 1.0,
            "weight_decay": weight_decay >= 0 and math.isfinite(weight_decay),
            "mc_samples": int(mc_samples) >= 1,
            "clip_radius": clip_radius > 0,
            "hess_init": math.isfinite(hess_init),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"IVON: invalid {name}={locals()[name]!r}")
        defaults = dict(
            lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
            clip_radius=clip_radius, step=0,
        )
        super().__init__(params, defaults)
        self.mc_samples = int(mc_samples)
        self.antithetic = antithetic
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.generator = generator
        self._count = 0
        self._draws = 0
        self._last_noise: list[Tensor] | None = None
        self._noise_now: list[Tensor] = []
        self._ahead: Iterator[list[Tensor]] | None = None
        self._samples: dict[int, Tensor] = {}  # θ's buffer per group, reused by every sample
        for group in self.param_groups:
            flat = group["flat"]
            group["hess"] = torch.full_like(flat, hess_init)
            group["momentum"] = torch.zeros_like(flat)
            group["prior_prec"] = torch.full_like(flat, ess * weight_decay)
            group["prior_center"] = torch.zeros_like(flat)
            group["prior_lin"] = torch.zeros_like(flat)
            group["prior64"] = None
            self._refresh(group)

    # ------------------------------------------------------------------ helpers
    def params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def current_step(self) -> int:
        return int(self.param_groups[0]["step"])

    @staticmethod
    def _refresh(group: dict[str, Any]) -> None:
        """Cache δ = s_π/ess, √(ess(h+δ)) and σ after h or the prior changed."""
        ess = group["ess"]
        group["delta"] = group["prior_prec"] / ess
        group["has_center"] = bool(group["prior_center"].any())
        group["has_lin"] = bool(group["prior_lin"].any())
        group["hd"] = group["hess"] + group["delta"]  # h + δ, reused by the next step's correction term
        group["inv_sigma"] = (group["hd"] * ess).sqrt_()

    def _split(self, group: dict[str, Any], flat: Tensor) -> list[Tensor]:
        out, i = [], 0
        for p in group["params"]:
            out.append(flat[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def _concat(self, tensors: Sequence[Tensor], group: dict[str, Any], what: str) -> Tensor:
        ps = group["params"]
        if len(tensors) != len(ps):
            raise ValueError(f"{what}: expected {len(ps)} tensors, got {len(tensors)}")
        for i, (p, t) in enumerate(zip(ps, tensors, strict=True)):
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{what}: tensor {i} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what}: tensor {i} has non-finite values")
        return torch.cat([t.reshape(-1).to(ps[0]) for t in tensors])

    def _per_group(self, tensors: Sequence[Tensor]) -> list[tuple[dict[str, Any], list[Tensor]]]:
        out, i = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            out.append((group, list(tensors[i : i + n])))
            i += n
        if i != len(tensors):
            raise ValueError(f"expected {i} tensors, got {len(tensors)}")
        return out

    # ------------------------------------------------------------------ prior / posterior as natural parameters
    @torch.no_grad()
    def set_prior(self, eta: Sequence[Tensor], prec: Sequence[Tensor]) -> None:
        """Set the prior π through its natural parameters (η_π, s_π), one tensor per parameter."""
        if len(eta) != len(prec):
            raise ValueError(f"set_prior: {len(eta)} eta tensors but {len(prec)} precision tensors")
        for (group, e), (_, s) in zip(self._per_group(eta), self._per_group(prec), strict=True):
            self._concat(e, group, "set_prior")  # shape / finiteness checks
            self._concat(s, group, "set_prior")
            e64 = torch.cat([t.reshape(-1).double() for t in e])
            s64 = torch.cat([t.reshape(-1).double() for t in s])
            center, lin = split_natural(e64, s64)
            # float64 copies for the site, so s_π(m − m_π) keeps the digits of the float64 prior
            group["prior64"] = (s64, center, lin)
            flat = group["flat"]
            group["prior_prec"] = s64.to(flat)
            group["prior_center"] = center.to(flat)
            group["prior_lin"] = lin.to(flat)
            self._refresh(group)

    @torch.no_grad()
    def set_hess(self, hess: Sequence[Tensor]) -> None:
        for group, h in self._per_group(hess):
            group["hess"] = self._concat(h, group, "set_hess")
            self._refresh(group)

    def hess(self) -> list[Tensor]:
        """The data curvature h, one tensor per parameter (views)."""
        return [t for g in self.param_groups for t in self._split(g, g["hess"])]

    @torch.no_grad()
    def posterior(self) -> tuple[list[Tensor], list[Tensor]]:
        """(mean, precision) with Λ = ess·h + s_π."""
        means, precs = [], []
        for group in self.param_groups:
            means += [t.clone() for t in self._split(group, group["flat"])]
            precs += self._split(group, group["ess"] * group["hess"] + group["prior_prec"])
        return means, precs

    @torch.no_grad()
    def site(self, min_post_prec: float = 0.0, signed: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """The site λ̃ = (η̃, s̃) = (ess·h⊙m + s_π⊙m − η_π, ess·h), computed directly, in float64.

        By default s̃ is floored at max(0, min_post_prec − s_π) (a PVI site never removes evidence and the
        posterior it implies stays proper).  ``signed=True`` returns s̃ = ess·h as it is (it may be negative
        where the noisy curvature estimate is): the implied posterior precision s_π + s̃ = ess·(h + δ) is > 0
        anyway, which is all an ADMM rule needs (bayes-admm).  η̃ is formed so that the implied posterior mean
        is exactly m.
        """
        etas, precs = [], []
        for group in self.param_groups:
            prior64 = group["prior64"]
            if prior64 is None:
                prior64 = (group["prior_prec"].double(), group["prior_center"].double(),
                           group["prior_lin"].double())
            eta, s_site = ivon_site(group["ess"], group["hess"], group["flat"], *prior64, signed=signed,
                                    min_post_prec=min_post_prec)
            etas += self._split(group, eta)
            precs += self._split(group, s_site)
        return etas, precs

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for group in self.param_groups:
            self._refresh(group)

    # ------------------------------------------------------------------ sampling
    def _draw(self) -> list[Tensor]:
        """One sample's noise: a ``randn`` of each group's size, group by group, from the generator."""
        return [torch.randn(g["flat"].numel(), generator=self.generator, dtype=g["flat"].dtype,
                            device=g["flat"].device) for g in self.param_groups]

    def draws_per_step(self) -> int:
        """Noise draws one step makes: one per sample, or one per antithetic pair."""
        return (self.mc_samples + 1) // 2 if self.antithetic else self.mc_samples

    def plan_draws(self, draws: int) -> None:
        """Announce that the next ``draws`` noise draws will be asked for (``steps * draws_per_step()``): they are
        then made one ahead on a worker thread (:mod:`fedbayes.noise`), bit-identical to drawing inline, never
        beyond ``draws``.  Only with a generator of the optimiser's own (the global one is shared) and noise on a
        CPU; a call replaces an earlier plan, and once the plan is used up draws are made inline again."""
        flat = self.param_groups[0]["flat"]
        if self.generator is None or draws <= 0 or not ahead_enabled(flat.device):
            self._ahead = None
            return
        self._ahead = run_ahead(self._draw for _ in range(draws))

    def _noise(self) -> list[Tensor]:
        if self.antithetic and self._draws % 2 == 1 and self._last_noise is not None:
            return [-e for e in self._last_noise]
        eps = None
        if self._ahead is not None:
            eps = next(self._ahead, None)
            if eps is None:
                self._ahead = None
        if eps is None:
            eps = self._draw()
        self._last_noise = eps
        return eps

    @staticmethod
    def _point(group: dict[str, Any], buf: Tensor) -> None:
        """Make the group's parameters views into ``buf`` (the mean ``flat`` or the sample buffer)."""
        i = 0
        for p in group["params"]:
            n = p.numel()
            p.data = buf[i : i + n].view_as(p)
            i += n

    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Replace the weights by a posterior sample θ = m + σε inside the block.

        With ``train=True`` the gradients present on exit are accumulated for the next :meth:`step`
        (a parameter without a gradient contributes zero).
        """
        with torch.no_grad():
            self._noise_now = self._noise()
            for gi, group in enumerate(self.param_groups):
                flat = group["flat"]
                # θ = m + ε/σ⁻¹ into a buffer of its own, and the parameters pointed at it for the block: the mean
                # is never overwritten, so nothing is copied out and back (two passes over P per sample)
                sample = self._samples.get(gi)
                if sample is None or sample.shape != flat.shape or sample.dtype != flat.dtype:
                    sample = self._samples[gi] = torch.empty_like(flat)
                ivon_sample(flat, self._noise_now[gi], group["inv_sigma"], out=sample)
                self._point(group, sample)
        self._draws += 1
        try:
            yield
        finally:
            with torch.no_grad():
                n = self._count
                for gi, group in enumerate(self.param_groups):
                    self._point(group, group["flat"])
                    if not train:
                        continue
                    # the first sample writes straight into the running means' buffers, later ones into scratch
                    first = n == 0
                    g = self.flat_grad(group, out=self._scratch(group, "avg_grad" if first else "grad"))
                    gx = price_hess_sample(g, self._noise_now[gi], group["inv_sigma"],
                                           out=self._scratch(group, "avg_hhat" if first else "hhat"))
                    if first:
                        group["avg_grad"], group["avg_hhat"] = g, gx
                    else:
                        running_mean_(group["avg_grad"], g, n)
                        running_mean_(group["avg_hhat"], gx, n)
                if train:
                    self._count += 1

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One IVON update from the samples accumulated since the last step.

        ``closure`` (as ``torch.optim``'s: zero the gradients, compute the loss, ``backward()``, return the loss)
        with no samples accumulated yet: it is called at ``mc_samples`` posterior samples θ ~ q, each inside
        :meth:`sampled_params`, and their mean loss is returned.  With samples already accumulated (the explicit
        loop), it is called once at the mean, as torch's optimisers do."""
        loss = None
        if closure is not None and self._count == 0:
            losses = []
            for _ in range(self.mc_samples):
                with torch.enable_grad(), self.sampled_params(train=True):
                    losses.append(closure())
            loss = losses[0] if len(losses) == 1 else sum(losses) / len(losses)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._count == 0:
            raise RuntimeError(
                "IVON.step(): no gradient samples; call loss.backward() inside "
                "`with optimizer.sampled_params(train=True):` before step()"
            )
        for group in self.param_groups:
            group["step"] += 1
            t = group["step"]
            ess, b1, b2, lr = group["ess"], group["beta1"], group["beta2"], group["lr"]
            if self.rescale_lr:
                lr = lr * (group["hess_init"] + group["weight_decay"])
            ivon_step_(group["flat"], group["hess"], group["momentum"], group["hd"], group["inv_sigma"],
                       group.pop("avg_grad"), group.pop("avg_hhat"), group["delta"], ess=ess, lr=lr, beta1=b1,
                       beta2=b2, debias=1.0 - b1**t if self.debias else 1.0, clip=group["clip_radius"],
                       center=group["prior_center"] if group["has_center"] else None,
                       lin=group["prior_lin"] if group["has_lin"] else None, tmp=self._scratch(group, "tmp"))
        self._count = 0
        self._draws = 0
        return loss
