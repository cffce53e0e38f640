"""Diagonal Gaussians over a model's named parameters, carried as natural parameters.

A diagonal Gaussian q(θ) = N(m, diag(1/s)) over the parameters of a model is stored as two dicts keyed by
parameter name: the precision ``prec`` = s and the first natural parameter ``eta`` = s ⊙ m.  Natural
parameters add under multiplication of densities, which is all federated Bayes needs:

* global posterior     λ = λ₀ + Σₖ λ̃ₖ                       (``prior + sum(sites)``)
* cavity of client k   λ₋ₖ = λ − λ̃ₖ                        (``global - site``)
* damping              λ̃ₖ ← (1 − ρ) λ̃ₖ + ρ λ̃ₖ_new          (``site.scale(1-ρ) + new.scale(ρ)``)

Nothing here divides by a precision except :meth:`DiagGaussian.mean` and :meth:`DiagGaussian.var`, which
check positivity first (``ValueError`` naming the parameter).  Server state uses float64; what travels is
float32 (:meth:`DiagGaussian.to`).  Sites may carry zero precision (a flat factor), and an ADMM-style factor
may even carry negative precision; :meth:`DiagGaussian.validate` decides what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]

__all__ = ["DiagGaussian", "Params", "check_same_layout"]


def check_same_layout(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "gaussian") -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same parameter names and shapes."""
    if list(a) != list(b):
        missing = [k for k in a if k not in b]
        extra = [k for k in b if k not in a]
        if missing or extra:
            raise ValueError(f"{what}: parameter names differ (missing {missing}, unexpected {extra})")
        raise ValueError(f"{what}: parameter order differs: {list(b)} vs {list(a)}")
    for k in a:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise ValueError(
                f"{what}: parameter '{k}' has shape {tuple(b[k].shape)}, expected {tuple(a[k].shape)}"
            )


@dataclass(frozen=True)
class DiagGaussian:
    """A diagonal Gaussian in natural parameters (η, s) keyed by parameter name.

    Parameters
    ----------
    eta : dict[str, Tensor]
        First natural parameter η = s ⊙ m.
    prec : dict[str, Tensor]
        Precision s (the diagonal of the inverse covariance).
    """

    eta: Params
    prec: Params

    def __post_init__(self) -> None:
        check_same_layout(self.prec, self.eta, "DiagGaussian(eta vs prec)")
        for k in self.eta:
            if self.eta[k].dtype != self.prec[k].dtype:
                raise ValueError(f"DiagGaussian: '{k}' has eta dtype {self.eta[k].dtype} != prec dtype")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_mean_prec(mean: Mapping[str, Tensor], prec: Mapping[str, Tensor]) -> DiagGaussian:
        check_same_layout(mean, prec, "from_mean_prec")
        return DiagGaussian({k: prec[k] * mean[k] for k in mean}, {k: prec[k].clone() for k in prec})

    @staticmethod
    def isotropic(
        template: Mapping[str, Tensor],
        prec: float,
        mean: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> DiagGaussian:
        """N(mean, prec⁻¹ I) with the names and shapes of ``template`` (zero mean by default)."""
        p = {k: torch.full(v.shape, float(prec), dtype=dtype) for k, v in template.items()}
        e = {k: torch.zeros(v.shape, dtype=dtype) for k, v in template.items()}
        if mean is not None:
            check_same_layout(template, mean, "isotropic(mean)")
            e = {k: p[k] * mean[k].to(dtype) for k in template}
        return DiagGaussian(e, p)

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> list[str]:
        return list(self.eta)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.eta.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.eta.values())).dtype

    def numel(self) -> int:
        return sum(v.numel() for v in self.eta.values())

    def _check_positive(self, floor: float = 0.0) -> None:
        for k, s in self.prec.items():
            bad = ~(s > floor)
            if bool(bad.any()):
                raise ValueError(
                    f"parameter '{k}': precision must be > {floor} to form a mean/variance "
                    f"({int(bad.sum())} of {s.numel()} entries are not; min {float(s.min()):.3g})"
                )

    def mean(self) -> Params:
        """m = η / s (requires s > 0)."""
        self._check_positive()
        return {k: self.eta[k] / self.prec[k] for k in self.eta}

    def var(self) -> Params:
        """Diagonal variance 1/s (requires s > 0)."""
        self._check_positive()
        return {k: 1.0 / self.prec[k] for k in self.prec}

    # ------------------------------------------------------------------ algebra on natural parameters
    def _binary(self, other: DiagGaussian, sign: float) -> DiagGaussian:
        check_same_layout(self.eta, other.eta, "DiagGaussian arithmetic")
        return DiagGaussian(
            {k: self.eta[k] + sign * other.eta[k].to(self.eta[k].dtype) for k in self.eta},
            {k: self.prec[k] + sign * other.prec[k].to(self.prec[k].dtype) for k in self.prec},
        )

    def __add__(self, other: DiagGaussian) -> DiagGaussian:
        return self._binary(other, 1.0)

    def __sub__(self, other: DiagGaussian) -> DiagGaussian:
        return self._binary(other, -1.0)

    def scale(self, c: float) -> DiagGaussian:
        """c·λ (a power of the density); used for damping and tempering."""
        return DiagGaussian({k: c * v for k, v in self.eta.items()}, {k: c * v for k, v in self.prec.items()})

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> DiagGaussian:
        return DiagGaussian(
            {k: v.to(dtype=dtype, device=device) for k, v in self.eta.items()},
            {k: v.to(dtype=dtype, device=device) for k, v in self.prec.items()},
        )

    def clone(self) -> DiagGaussian:
        return DiagGaussian(
            {k: v.clone() for k, v in self.eta.items()}, {k: v.clone() for k, v in self.prec.items()}
        )

    def clamp_prec(self, floor: float) -> DiagGaussian:
        """Raise every precision to at least ``floor`` keeping the mean fixed where s > 0."""
        prec = {k: s.clamp_min(floor) for k, s in self.prec.items()}
        eta = {}
        for k, s in self.prec.items():
            ratio = torch.where(s > 0, prec[k] / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
            eta[k] = self.eta[k] * ratio
        return DiagGaussian(eta, prec)

    # ------------------------------------------------------------------ sampling and flattening
    def sample(self, generator: torch.Generator | None = None, n: int = 1) -> list[Params]:
        """Draw ``n`` parameter dicts θ = m + ε/√s."""
        mean, var = self.mean(), self.var()
        out = []
        for _ in range(n):
            out.append(
                {
                    k: mean[k] + var[k].sqrt() * torch.randn(mean[k].shape, generator=generator, dtype=mean[k].dtype)
                    for k in mean
                }
            )
        return out

    def flatten(self) -> tuple[Tensor, Tensor]:
        """(η, s) as two flat vectors in parameter order."""
        return (
            torch.cat([v.reshape(-1) for v in self.eta.values()]),
            torch.cat([v.reshape(-1) for v in self.prec.values()]),
        )

    @staticmethod
    def unflatten(eta: Tensor, prec: Tensor, shapes: Mapping[str, tuple[int, ...]]) -> DiagGaussian:
        total = sum(int(torch.Size(s).numel()) for s in shapes.values())
        if eta.numel() != total or prec.numel() != total:
            raise ValueError(f"unflatten: got {eta.numel()}/{prec.numel()} numbers for {total} parameters")
        e, p, i = {}, {}, 0
        for k, shp in shapes.items():
            n = int(torch.Size(shp).numel())
            e[k] = eta[i : i + n].reshape(shp)
            p[k] = prec[i : i + n].reshape(shp)
            i += n
        return DiagGaussian(e, p)

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        template: Mapping[str, Tensor] | Mapping[str, tuple[int, ...]] | None = None,
        *,
        min_prec: float | None = 0.0,
        strict_positive: bool = False,
        what: str = "gaussian",
    ) -> DiagGaussian:
        """Check finiteness, precision bounds and (optionally) names/shapes; return self.

        Parameters
        ----------
        template
            Expected names and shapes (tensors or shape tuples), in order.
        min_prec
            Precisions below this are rejected (``None`` disables the check, e.g. ADMM factors).
        strict_positive
            Require precision > 0 (a proper distribution) instead of ≥ ``min_prec``.
        """
        if template is not None:
            shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in template.items()}
            if list(shapes) != list(self.eta):
                missing = [k for k in shapes if k not in self.eta]
                extra = [k for k in self.eta if k not in shapes]
                raise ValueError(f"{what}: parameter names differ (missing {missing}, unexpected {extra})")
            for k, shp in shapes.items():
                if tuple(self.eta[k].shape) != shp:
                    raise ValueError(
                        f"{what}: parameter '{k}' has shape {tuple(self.eta[k].shape)}, expected {shp}"
                    )
        for k in self.eta:
            for part, t in (("eta", self.eta[k]), ("prec", self.prec[k])):
                if not t.is_floating_point():
                    raise ValueError(f"{what}: parameter '{k}' {part} has non-float dtype {t.dtype}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{what}: parameter '{k}' {part} has non-finite values (NaN or Inf)")
            s = self.prec[k]
            if strict_positive and not bool((s > 0).all()):
                raise ValueError(f"{what}: parameter '{k}' precision must be > 0 (min {float(s.min()):.3g})")
            if min_prec is not None and not bool((s >= min_prec).all()):
                raise ValueError(
                    f"{what}: parameter '{k}' precision must be >= {min_prec} (min {float(s.min()):.3g})"
                )
        return self
