"""The IVON, Adam and SGD update maths, written once as small functions over tensors.

Both layouts call them: the sequential optimisers (:class:`fedbayes.ivon.IVON`, :class:`fedbayes.optim.Adam`,
:class:`fedbayes.optim.SGD`: one flat vector per parameter group, scalar ess and learning rate) and the batched
clients (:mod:`fedbayes.batched`: (clients, P) buffers, ess and learning rate as (clients, 1) columns).  Each
function is named after the equation it computes (``shared/reference/ivon.md`` §1–2; Kingma & Ba 2015) and keeps
no state of its own: the caller owns every buffer, and the functions write in place (suffix ``_``) into the
buffers they are given, because on a CPU an IVON step is memory-bound and every fresh (C, P) allocation or extra
pass costs (docs/engine.md: scratch buffers, σ⁻¹ cached, ĥ's first sample written straight into its mean).

Scalars or columns: ``ess`` and ``lr`` are a float (one client) or a (C, 1) tensor (one per row).  The two forms
run the kernels each layout always ran (``sub_(x, alpha=lr)`` for a float, ``addcmul_`` with the column for a
tensor), so no number changed when the maths moved here (golden runs, tests/test_batched.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "adam_step_", "heavy_ball_", "ivon_sample", "ivon_site", "ivon_step_", "price_hess_sample", "running_mean_",
    "sgd_step_", "site_eta",
]


# ------------------------------------------------------------------------------------------------ IVON
def ivon_sample(m: Tensor, eps: Tensor, inv_sigma: Tensor, out: Tensor) -> Tensor:
    """θ = m + σ ⊙ ε with σ = 1/√(ess·(h + δ)), given σ⁻¹ (kept between steps), written into ``out``."""
    return torch.addcdiv(m, eps, inv_sigma, out=out)


def price_hess_sample(grad: Tensor, eps: Tensor, inv_sigma: Tensor, out: Tensor) -> Tensor:
    """One sample of the Price estimator ĥ = ∇ℓ̄(θ) ⊙ (θ − m)/σ² = ∇ℓ̄(θ) ⊙ ε ⊙ σ⁻¹, written into ``out``."""
    return torch.mul(grad, eps, out=out).mul_(inv_sigma)


def running_mean_(avg: Tensor, sample: Tensor, n: int) -> None:
    """Welford's mean over the samples of one step: avg ← avg + (x − avg)/(n + 1) for the (n+1)-th sample x
    (``sample`` is overwritten)."""
    avg.add_(sample.sub_(avg), alpha=1.0 / (n + 1))


def ivon_step_(
    m: Tensor, h: Tensor, mom: Tensor, hd: Tensor, inv_sigma: Tensor, g_bar: Tensor, h_hat: Tensor, delta: Tensor,
    *, ess: float | Tensor, lr: float | Tensor, beta1: float, beta2: float, debias: float, clip: float,
    center: Tensor | None, lin: Tensor | None, tmp: Tensor,
) -> None:
    """One IVON update, in place, from the step's sample means ḡ (``g_bar``) and ĥ (``h_hat``)::

        g ← β1 g + (1 − β1) ḡ
        h ← β2 h + (1 − β2) ĥ + ½(1 − β2)² (h − ĥ)² / (h + δ)          (Riemannian correction)
        m ← m − α · clip((g/(1 − β1ᵗ) + δ ⊙ (m − c) − r/ess) / (h + δ), ±r_clip)
        σ⁻¹ ← √(ess·(h + δ))

    ``hd`` holds h + δ of the *old* h on entry (the correction's denominator) and the new one on exit; ``debias``
    is 1 − β1ᵗ (or 1); ``center``/``lin`` are the prior's c and r (:func:`fedbayes.ivon.split_natural`), None where
    they are zero everywhere; ``tmp`` is a scratch buffer of m's shape (``h_hat`` and ``tmp`` are overwritten).
    """
    mom.lerp_(g_bar, 1.0 - beta1)
    corr = torch.sub(h, h_hat, out=tmp).square_().div_(hd)
    h.lerp_(h_hat, 1.0 - beta2).add_(corr, alpha=0.5 * (1.0 - beta2) ** 2)
    denom = torch.add(h, delta, out=hd)  # h + δ in place: the correction term has used the old one
    num = torch.sub(m, center, out=tmp).mul_(delta) if center is not None else torch.mul(m, delta, out=tmp)
    num.add_(mom, alpha=1.0 / debias)
    if lin is not None:
        if isinstance(ess, Tensor):
            num.addcmul_(lin, ess.reciprocal().neg_())
        else:
            num.sub_(lin, alpha=1.0 / ess)
    upd = num.div_(denom)
    if math.isfinite(clip):
        upd.clamp_(-clip, clip)
    if isinstance(lr, Tensor):
        m.addcmul_(upd, lr, value=-1.0)
    else:
        m.sub_(upd, alpha=lr)
    torch.mul(denom, ess, out=inv_sigma).sqrt_()


def site_eta(s_site: Tensor, m: Tensor, s_pi: Tensor, center: Tensor, lin: Tensor) -> Tensor:
    """The site's first natural parameter given its precision s̃ and the posterior mean m it implies under the prior
    (s_π, c, r) of :func:`fedbayes.ivon.split_natural`: η̃ = s̃ ⊙ m + s_π ⊙ (m − c) − r (so that
    (η_π + η̃)/(s_π + s̃) = m), written without the difference of two large numbers.  Shared by IVON, Laplace and
    batched sites; call it in float64."""
    return s_site * m + s_pi * (m - center) - lin


def ivon_site(ess: float, h: Tensor, m: Tensor, s_pi: Tensor, center: Tensor, lin: Tensor, *, signed: bool,
              min_post_prec: float = 0.0) -> tuple[Tensor, Tensor]:
    """IVON's site (η̃, s̃) in float64: s̃ = ess·h, floored at max(0, min_post_prec − s_π) unless ``signed`` (a PVI
    site never removes evidence; an ADMM rule takes it as it is), and η̃ from :func:`site_eta` with the float64
    prior (s_π, c, r)."""
    s_site = ess * h.double()
    if not signed:
        s_site = torch.maximum(s_site.clamp_min(0.0), (min_post_prec - s_pi).clamp_min(0.0))
    return site_eta(s_site, m.double(), s_pi, center, lin), s_site


# ------------------------------------------------------------------------------------------------ Adam, SGD
def adam_step_(theta: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, denom: Tensor, *,
               lr: float | Tensor, beta1: float, beta2: float, step: int, eps: float) -> None:
    """Adam (Kingma & Ba 2015; torch's default: no AMSGrad, no weight decay), in place::

        m₁ ← β1 m₁ + (1 − β1) g,   m₂ ← β2 m₂ + (1 − β2) g²
        θ ← θ − α (m₁/(1 − β1ᵗ)) / (√(m₂/(1 − β2ᵗ)) + ε)

    ``denom`` is a scratch buffer of θ's shape."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    torch.sqrt(exp_avg_sq, out=denom).div_(math.sqrt(1.0 - beta2**step)).add_(eps)
    if isinstance(lr, Tensor):
        theta.addcmul_(torch.div(exp_avg, denom, out=denom), lr, value=-1.0 / (1.0 - beta1**step))
    else:
        theta.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))


def heavy_ball_(buf: Tensor, grad: Tensor, momentum: float, first: bool) -> Tensor:
    """Heavy-ball momentum b ← μ b + g (b = g at the first step), in place; returns b."""
    return buf.copy_(grad) if first else buf.mul_(momentum).add_(grad)


def sgd_step_(theta: Tensor, direction: Tensor, lr: float | Tensor) -> None:
    """θ ← θ − α d (d: the gradient, or the momentum buffer of :func:`heavy_ball_`)."""
    if isinstance(lr, Tensor):
        theta.addcmul_(direction, lr, value=-1.0)
    else:
        theta.add_(direction, alpha=-lr)
