"""Posterior-averaged predictions of a diagonal Gaussian posterior q(θ) = N(m, diag σ²): the Bayesian model
average p(y | x) = E_q[p(y | x, θ)] reported as ``bma_{test,val}_*``, formed one of three ways (run key
``bma-predictive``; ``bma-scale`` multiplies every σ²):

* ``"linearized-probit"`` (the default) — the linearised (GLM) predictive of Immer, Korzepa & Bauer, "Improving
  predictions of Bayesian neural nets via local linearization" (AISTATS 2021): f(x; θ) ≈ f(x; m) + J(x)(θ − m),
  so the outputs are Gaussian, f ~ N(f(x; m), J Σ Jᵀ), and the class probabilities are approximated by
  softmax(μ_c / √(1 + π/8 · Σ_cc)) (the probit approximation; deterministic; laplace-torch's default too).
  For a Gaussian likelihood the predictive is closed form, N(f(x; m), JΣJᵀ + σ²_noise).
* ``"linearized"`` — the same Gaussian outputs, E[softmax f] by Monte Carlo (``bma-logit-samples`` draws, the
  same antithetic standard-normal draws for every example; seeded).
* ``"sample"`` — draw ``bma-samples`` networks θ ~ q and average their predictions.

**The output covariance.**  We keep the full C×C covariance JΣJᵀ (the Monte-Carlo predictive uses it; the probit
its diagonal): it is exact at the same cost.  For a network made only of ``nn.Linear`` layers z = W a + b (any
element-wise activations in between) the Jacobian of output c with respect to W_ij is δᶜ_i a_j with
δᶜ = ∂f_c/∂z, so

    Σ_ij J_c,ij J_d,ij σ²_ij = Σ_i δᶜ_i δᵈ_i u_i,      u = (a ⊙ a) (σ²_W)ᵀ + σ²_b,

one backward pass per output class and one matrix product per layer, without per-example Jacobians (the trick
of :func:`fedbayes.curvature.diag_ggn`).  An ``nn.Conv2d`` layer's Jacobian row is δᶜ Uᵀ with U = unfold(a), formed
per example (a bmm per class, not the whole parameter vector's Jacobian); other models fall back to per-example
Jacobians (``torch.func.vmap(jacrev)``) in chunks.  On the built-in ``cnn`` (107,786 parameters; ``fedbayes bench
cnn --what predictive --examples 500``, one thread, 2026-12-07) the moments of 500 test images cost 4.5 local Adam
epochs over 500 training images, and ``vmap(jacrev)`` 77× more (before the conv path, one round's evaluation of a
3-client CNN on 2,000 test images took 9 minutes).  Cost on 10,000 Fashion-MNIST test images (MLP 784-200-100-10, one
busy CPU thread): the moments ~1.5 s, the probit nothing more, 1024 Monte-Carlo draws ~3.5 s; ``"sample"`` with
16 networks ~2 s.

**Decision, measured on the validation split only** (600 held-out Fashion-MNIST training images no client holds;
``validation-fraction = 0.1``, ``eval-split = validation``; saved posteriors re-evaluated with ``fedbayes
evaluate RUN --split validation --set bma-predictive=… --set bma-scale=…``).  Accuracy/NLL/ECE:

=========================  =================  =================  =================  =================
run                        mean prediction    sample (16 nets)   linearized (MC)    linearized-probit
=========================  =================  =================  =================  =================
fedlap-cov, demo           0.770/0.633/0.087  0.258/2.146/0.104  0.763/1.027/0.334  0.775/0.951/0.310
fedlap-cov, fmnist-10-het  0.838/0.463/0.038  0.227/2.146/0.055  0.825/1.028/0.418  0.830/1.008/0.408
bayes-admm τ=1e-3, demo    0.612/1.212/0.183  0.602/1.253/0.195  0.612/1.213/0.187  0.612/1.212/0.183
bayes-admm τ=1e-2, demo    0.553/1.066/0.124  0.593/1.313/0.243  0.540/1.090/0.109  0.550/1.075/0.106
bayes-admm τ=1e-1, demo    0.207/2.011/0.312  0.187/2.191/0.045  0.198/2.033/0.304  0.222/1.806/0.125
bayes-admm, fmnist-10-het  0.818/0.548/0.051  0.820/0.568/0.072  0.818/0.549/0.059  0.820/0.549/0.057
pvi, demo                  0.412/1.487/0.108  0.413/1.494/0.109  0.412/1.487/0.108  0.412/1.487/0.106
pvi, fmnist-10-het         0.682/0.914/0.138  0.680/0.921/0.140  0.682/0.915/0.138  0.682/0.914/0.138
centralized-ivon, demo     0.833/0.478/0.058  0.830/0.482/0.058  0.833/0.478/0.056  0.832/0.478/0.063
=========================  =================  =================  =================  =================

(demo: 10 rounds; fmnist-10-het: 50 rounds; both 10 heterogeneous clients on 10 % of Fashion-MNIST, seed 0;
pvi and centralized-ivon with bayes-admm's IVON settings, τ = 10⁻³.)

* **fedlap-cov.**  Its diagonal GGN-Laplace posterior keeps precision ≈ δ = 1 wherever the GGN is ≈ 0 (σ² ≈ 0.8
  on the input weights, which are ~10⁻² in size): the GGN Σ Jᵀ(diag p − ppᵀ)J vanishes on confidently fitted
  training points.  Sampling whole networks from it gives noise (accuracy 0.23–0.26).  The linearised predictive
  sees that variance only through J(x), and brings the posterior-averaged accuracy back to within a point of the
  mean prediction (probit: +0.5 and −0.8 points; Monte Carlo: −0.7 and −1.3): Immer et al.'s point, that a
  GGN-Laplace posterior belongs with the GLM predictive.  It is still far too wide to be calibrated (NLL 1.0 vs
  0.46–0.63, underconfident), and shrinking it (``bma-scale`` 0.001–1) lowers the validation NLL monotonically
  towards the mean prediction's: no scale makes it better than the mean.
* **the IVON rules** (bayes-admm, pvi, centralized-ivon) at τ = 10⁻³: the posterior is nearly a point mass and
  the linearised predictives equal the mean prediction to ±0.002 NLL; sampling 16 networks adds Monte-Carlo
  noise (NLL +0.004 to +0.04 over the probit).  Larger ``bma-scale`` (3–1000) only raised the validation NLL
  (the scale with the lowest validation NLL in the grid 0.001–100 was its smallest, 0.001, for every run but
  the untrained τ = 10⁻¹ one).  A warmer posterior does not help either: τ = 10⁻² trades 6 points of the mean's
  accuracy for a lower NLL, and its posterior average has a lower ECE than its mean (0.11 vs 0.12) but a higher
  NLL (1.075 vs 1.066); τ = 10⁻¹ does not train in 10 rounds.
* Why nothing beats the mean here: every one of these mean predictions is *under*confident or calibrated (mean
  confidence 0.33–0.83 against accuracy 0.41–0.84; fedlap-cov at 50 rounds 0.834 vs 0.838), and a posterior
  average can only spread probability further.

So ``linearized-probit`` is the default for every rule: it is never worse than sampling on NLL, fixes
fedlap-cov's posterior average (within a point of the mean), is deterministic and costs about as much as
sampling 16 networks.  ``bma-scale`` stays 1 (the posterior as trained), and the mean prediction stays the
headline of ``compare``'s table (the posterior average is reported next to it: accuracy, NLL and ECE), because
on these validation numbers the posterior average is not better calibrated than the mean for any rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from fedbayes.curvature import fast_layers
from fedbayes.gaussian import DiagGaussian

__all__ = [
    "PREDICTIVES",
    "gaussian_softmax",
    "linearized_moments",
    "predictive_outputs",
]

PREDICTIVES = ("linearized-probit", "linearized", "sample")
"""The posterior-averaged predictives (run key ``bma-predictive``)."""


def _layer_names(model: nn.Module) -> dict[nn.Module, tuple[str, str | None]] | None:
    """Layer -> (weight name, bias name) when every parametrised module is an ``nn.Linear`` or an ``nn.Conv2d``
    (:func:`fedbayes.curvature.fast_layers`), else None."""
    layers = fast_layers(model)
    if layers is None:
        return None
    ids = {id(m) for m in layers}
    out: dict[nn.Module, tuple[str, str | None]] = {}
    for name, mod in model.named_modules():
        if id(mod) in ids:
            pre = f"{name}." if name else ""
            out[mod] = (pre + "weight", None if getattr(mod, "bias", None) is None else pre + "bias")
    return out


def _moments_layers(
    model: nn.Module, names: dict[nn.Module, tuple[str, str | None]], mean: Mapping[str, Tensor],
    var: Mapping[str, Tensor], x: Tensor,
) -> tuple[Tensor, Tensor] | None:
    """f(x; m) (n, C) and JΣJᵀ (n, C, C) for a network of Linear and Conv2d layers; None if a layer ran more than
    once (shared weights: the per-use formula would miss the cross terms).

    With δᶜ = ∂f_c/∂z at a layer's output z: a Linear layer's Jacobian row is δᶜ aᵀ, so its term is
    Σ_i δᶜ_i δᵈ_i u_i with u = (a ⊙ a)(σ²_W)ᵀ + σ²_b (one product); a Conv2d's is δᶜ Uᵀ with U = unfold(a)
    (O × K per example; the sum over output positions sits inside it, so it is formed per example), and its term
    Σ_{o,k} (δᶜUᵀ)_ok (δᵈUᵀ)_ok σ²_ok, plus the bias's Σ_o (Σ_l δᶜ_ol)(Σ_l δᵈ_ol) σ²_b,o.
    """
    records: list[tuple[nn.Module, Tensor, Tensor]] = []

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        records.append((mod, inp[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        params = {k: v.detach().requires_grad_(True) for k, v in mean.items()}
        with torch.enable_grad():
            f = functional_call(model, params, (x,))
            if len(records) != len(names) or len({id(m) for m, _, _ in records}) != len(names):
                return None
            f2 = f.reshape(f.shape[0], -1)
            n_out = f2.shape[1]
            outs = [z for _, _, z in records]
            deltas = [torch.autograd.grad(f2[:, c].sum(), outs, retain_graph=c < n_out - 1) for c in range(n_out)]
    finally:
        for h in handles:
            h.remove()
    n = f2.shape[0]
    cov = torch.zeros(n, n_out, n_out, dtype=torch.float64, device=f2.device)
    for li, (mod, a, _) in enumerate(records):
        w_name, b_name = names[mod]
        if isinstance(mod, nn.Conv2d):
            # the Jacobian rows in the model's precision (float32: half the time of float64), summed in float64
            u = nn.functional.unfold(a, mod.kernel_size, dilation=mod.dilation,  # type: ignore[arg-type]
                                     padding=mod.padding, stride=mod.stride)  # type: ignore[arg-type]
            d = torch.stack([deltas[c][li].reshape(n, mod.out_channels, -1) for c in range(n_out)], 1)
            g = torch.einsum("ncol,nkl->ncok", d, u).reshape(n, n_out, -1).double()  # (n, C, O·K): Jacobian rows
            cov += torch.bmm(g * var[w_name].reshape(-1).to(g), g.transpose(1, 2))
            if b_name is not None:
                gb = d.sum(3).double()  # (n, C, O)
                cov += torch.bmm(gb * var[b_name].to(gb), gb.transpose(1, 2))
            continue
        a2 = (a.double() ** 2).reshape(-1, a.shape[-1])
        v = a2 @ var[w_name].to(a2).T  # (n, out): Σ_j a_j² σ²_ij
        if b_name is not None:
            v = v + var[b_name].to(a2)
        d = torch.stack([deltas[c][li].double().reshape(v.shape) for c in range(n_out)], 1)  # (n, C, out)
        cov += torch.bmm(d * v[:, None, :], d.transpose(1, 2))  # Σ_i δᶜ_i δᵈ_i u_i
    return f2.detach(), cov


def _moments_jacobian(
    model: nn.Module, mean: Mapping[str, Tensor], var: Mapping[str, Tensor], x: Tensor, chunk_bytes: int = 64 << 20,
) -> tuple[Tensor, Tensor]:
    """f(x; m) and JΣJᵀ from per-example Jacobians (any model), in chunks of at most ``chunk_bytes``."""
    params = {k: v.detach() for k, v in mean.items()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    with torch.no_grad():
        out = functional_call(model, params, (x,))
    out = out.reshape(out.shape[0], -1)
    n_out = out.shape[1]
    n_params = sum(v.numel() for v in params.values())
    chunk = max(1, int(chunk_bytes // max(1, n_out * n_params * x.element_size())))
    jac_fn = vmap(jacrev(f), in_dims=(None, 0))
    covs = []
    for i in range(0, x.shape[0], chunk):
        jac = jac_fn(params, x[i : i + chunk])  # name -> (b, C, *shape)
        c = torch.zeros(jac[next(iter(jac))].shape[0], n_out, n_out, dtype=torch.float64, device=x.device)
        for k, j in jac.items():
            j = j.reshape(j.shape[0], n_out, -1).double()
            c += torch.einsum("bcp,bdp,p->bcd", j, j, var[k].reshape(-1).to(j))
        covs.append(c)
    return out, torch.cat(covs)


@torch.no_grad()
def linearized_moments(
    model: nn.Module, mean: Mapping[str, Tensor], var: Mapping[str, Tensor], x: Tensor, chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Mean f(x; m) (n, C) and covariance J(x) diag(σ²) J(x)ᵀ (n, C, C, float64) of the linearised outputs.

    ``mean`` and ``var`` are keyed by parameter name (the model's order); the model's own weights are not used.
    Networks of Linear and Conv2d layers take the exact per-layer path (:func:`_moments_layers`; with
    convolutions in chunks of at most ``chunk // 4`` examples, their per-example Jacobian rows being larger),
    others ``vmap(jacrev)``.
    """
    names = _layer_names(model)
    if names is not None and any(isinstance(m, nn.Conv2d) for m in names):
        chunk = max(1, chunk // 4)
    mus, covs = [], []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        res = _moments_layers(model, names, mean, var, xb) if names is not None else None
        if res is None:
            res = _moments_jacobian(model, mean, var, xb)
        mus.append(res[0])
        covs.append(res[1])
    return torch.cat(mus), torch.cat(covs)


def gaussian_softmax(
    mu: Tensor, cov: Tensor, samples: int, generator: torch.Generator | None = None, probit: bool = False,
) -> Tensor:
    """E[softmax(f)] for f ~ N(mu, cov) per row: Monte Carlo with ``samples`` draws (seeded by ``generator``), or
    the probit approximation softmax(μ_c / √(1 + π/8 Σ_cc)) with ``probit=True``."""
    mu = mu.double()
    if probit:
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0))
        return (mu * kappa).softmax(-1)
    if samples < 1:
        raise ValueError(f"gaussian_softmax: samples must be >= 1, got {samples}")
    evals, evecs = torch.linalg.eigh(cov.double())  # a square root that tolerates singular covariances
    root = evecs * evals.clamp_min(0.0).sqrt()[..., None, :]  # (n, C, C): root rootᵀ = cov
    n, c = mu.shape
    # the same standard-normal draws for every example (common random numbers), in antithetic pairs ±ε: each
    # example's estimate is unbiased, drawing costs S·C numbers instead of n·S·C, and ±ε cancels the odd terms
    half = torch.randn((samples + 1) // 2, c, generator=generator, dtype=torch.float64)
    eps = torch.cat([half, -half])[:samples].to(mu.device)  # (S, C)
    rows = max(1, (1 << 21) // max(1, samples * c))  # ~16 MB of logits at a time
    out = []
    for i in range(0, n, rows):
        logits = torch.matmul(root[i : i + rows], eps.T) + mu[i : i + rows, :, None]  # (rows, C, S)
        logits = logits - logits.amax(1, keepdim=True)
        logits.exp_()
        out.append((logits / logits.sum(1, keepdim=True)).mean(2))
    return torch.cat(out)


def predictive_outputs(
    model: nn.Module,
    posterior: DiagGaussian,
    x: Tensor,
    task: str,
    *,
    predictive: str = "linearized",
    samples: int = 16,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor | None]:
    """The linearised predictive of ``posterior`` (variances × ``scale``) at ``x``: (class probabilities, None) for
    classification, (predictive mean, variance J Σ Jᵀ without the noise) for regression."""
    if predictive not in ("linearized", "linearized-probit"):
        raise ValueError(f"predictive_outputs: unknown linearised predictive {predictive!r}")
    mean = {k: v.to(device=device, dtype=torch.float32) for k, v in posterior.mean().items()}
    var = {k: (v * scale).to(device=device, dtype=torch.float64) for k, v in posterior.var().items()}
    mu, cov = linearized_moments(model, mean, var, x.to(device))
    mu, cov = mu.cpu().double(), cov.cpu()
    if task != "classification":
        return mu[:, 0], cov[:, 0, 0]
    return gaussian_softmax(mu, cov, samples, generator, probit=predictive == "linearized-probit"), None
