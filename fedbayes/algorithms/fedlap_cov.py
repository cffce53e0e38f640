"""FedLap-Cov (Swaroop, Khan, Doshi-Velez, ICLR 2025): Laplace PVI with learned diagonal precisions.

Sites tₖ ∝ exp(vₖᵀθ − ½θᵀVₖθ); client k minimises Nₖℓ̄ₖ(θ) under its cavity λ_g − λ̃ₖ (point mode, Adam),
then forms the diagonal GGN Hₖ of its *own* summed loss at mₖ (the reference code used all clients' data for
CIFAR — a privacy leak we do not copy).  New site: s̃ = Hₖ, η̃ = Hₖmₖ + s₋ₖ(mₖ − m₋ₖ); server as in
:mod:`fedbayes.algorithms.sites`:

    Vₖ ← (1 − ρ)Vₖ + ρHₖ,   vₖ ← vₖ + ρ(Sₖmₖ − S_g m_g),   S_g = δ + Σₖ Vₖ,   m_g = S_g⁻¹ Σₖ vₖ

(identical to damping the natural parameters of the site).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from fedbayes.algorithms.sites import SiteConfig, SiteRule

__all__ = ["FedLapCov", "FedLapCovConfig"]


class FedLapCovConfig(SiteConfig):
    rho: float = Field(0.5, gt=0.0, le=1.0, description="site damping ρ ∈ (0, 1] (ρ = 1 oscillates: where a "
                       "client's curvature is ~0 its Laplace site is only a linear pull)")


class FedLapCov(SiteRule):
    name: ClassVar[str] = "fedlap-cov"
    summary: ClassVar[str] = "Laplace PVI with diagonal-GGN sites, damped (Swaroop et al. 2025)"
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3, "laplace": True}
    Config = FedLapCovConfig
