"""FedLap-Cov (Swaroop, Khan, Doshi-Velez, ICLR 2025): Laplace PVI with learned diagonal precisions.

Sites tₖ ∝ exp(vₖᵀθ − ½θᵀVₖθ); client k minimises Nₖℓ̄ₖ(θ) under its cavity λ_g − λ̃ₖ (point mode, Adam),
then forms the diagonal GGN Hₖ of its *own* summed loss at mₖ (the reference code used all clients' data for
CIFAR — a privacy leak we do not copy).  New site: s̃ = Hₖ, η̃ = Hₖmₖ + s₋ₖ(mₖ − m₋ₖ); server as in
:mod:`fedbayes.algorithms.sites`:

    Vₖ ← (1 − ρ)Vₖ + ρHₖ,   vₖ ← vₖ + ρ(Sₖmₖ − S_g m_g),   S_g = δ + Σₖ Vₖ,   m_g = S_g⁻¹ Σₖ vₖ

(identical to damping the natural parameters of the site).

**ρ and the participants.**  Where a client's curvature Hₖ ≈ 0 its site is only a linear pull s₋ₖ(mₖ − m₋ₖ) of
the full cavity precision, so when the |S| participants of a round move, the global mean moves by ≈ |S|ρ times
their average displacement: |S|ρ is the server step, and ρ > 2/|S| overshoots and diverges (ρ = 0.5 with
K = |S| = 10 collapsed to chance for ~40 rounds).  So ρ is derived from |S|, the expected participants per round
(``clients-per-round`` of the K clients): ``rho-k`` = |S|ρ (default 1, a full step; the reference's ρ = 0.1 at
K = 10, every client every round) transfers across federation sizes and participation rates; an explicit
``rho`` (the paper's scale) overrides it; ρ > 2/|S| is rejected before training.  (ρ = ``rho-k``/K, an earlier
form, gave a tenth of the step with 10 of 100 clients a round: 0.41 test accuracy after 30 rounds of MNIST
with 2 classes per client, against FedAvg's 0.76.)

**Posterior average.**  The global posterior keeps precision ≈ δ where the GGN is ≈ 0, far too wide to sample whole
networks from (posterior-averaged accuracy 0.23–0.26 against 0.77–0.84 for the mean on Fashion-MNIST); the
default linearised (GLM) predictive, ``bma-predictive = "linearized-probit"``, is within a point of the mean
(:mod:`fedbayes.predictive` has the validation numbers).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from fedbayes.algorithms.base import AlgorithmConfig, KScaledRho
from fedbayes.algorithms.sites import SiteConfig, SiteRule
from fedbayes.algorithms.space import Dim, LogUniform

__all__ = ["FedLapCov", "FedLapCovConfig"]


class FedLapCovConfig(SiteConfig, KScaledRho):
    participates: ClassVar[bool] = True
    rho: float | None = Field(None, gt=0.0, le=1.0, description="site damping ρ ≤ 2/|S| (default: rho-k / |S|)")
    rho_k: float | None = Field(None, gt=0.0, le=2.0, description="|S|ρ, the server step, |S| the participants per "
                                "round (default 1; free of K and the participation rate)")


class FedLapCov(SiteRule):
    name: ClassVar[str] = "fedlap-cov"
    summary: ClassVar[str] = "Laplace PVI with diagonal-GGN sites, damped (Swaroop et al. 2025)"
    search_space: ClassVar[dict[str, Dim]] = {
        "lr": LogUniform(1e-4, 1e-2), "prior-prec": LogUniform(1e-2, 1e2), "rho-k": LogUniform(0.05, 2.0),
    }
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam", "lr": 1e-3, "laplace": True}
    Config = FedLapCovConfig
    config: FedLapCovConfig

    @classmethod
    def check_config(cls, config: AlgorithmConfig, num_clients: int, participants: int | None = None) -> None:
        assert isinstance(config, FedLapCovConfig)
        n = participants if participants is not None else num_clients
        rho = config.effective_rho(num_clients, n)
        if rho > 2.0 / n:
            raise ValueError(f"fedlap-cov: rho={rho:g} > 2/|S| = {2.0 / n:g} for |S|={n} participants a round "
                             "diverges (the server step is |S|·rho); use rho <= 1/|S| or set rho-k in (0, 2]")

    @property
    def rho(self) -> float:
        return self.config.effective_rho(len(self.active), self.participants)
