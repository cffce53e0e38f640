r"""What if client k had never taken part?  Removing, ranking, forgetting and merging client contributions.

The sites λ̃ₖ that fedbayes keeps are each client's contribution to the global posterior (DESIGN §2), so the
posterior "without the clients S" is answered from the stored state, without retraining:

.. math::  λ_{-S} = λ - \sum_{k∈S} \hat g_k

with :math:`\hat g_k` client k's contribution.  This is the memory-perturbation view of Nickl, Xu, Tailor,
Möllenhoff, Khan, "The Memory-Perturbation Equation: Understanding Model's Sensitivity to Data", NeurIPS 2023:
removing an example (here a client) from a posterior in natural parameters subtracts its site.  It is exact
for conjugate models trained to convergence (a Gaussian likelihood with XᵀX diagonal, tested) and a
first-order estimate otherwise — the remaining clients' sites would move a little if k were absent.

Contributions per algorithm: each rule's own :meth:`~fedbayes.algorithms.Algorithm.contributions`, with its
estimators listed in ``removal_estimators`` (the default first); no per-algorithm table here:

``pvi``, ``fedlap-cov`` — ``site``
    :math:`\hat g_k = \tilde λ_k`, the stored (damped) site.  The server keeps λ = λ₀ + Σₖ λ̃ₖ over all K
    (stale sites included), so :math:`λ_{-S} = λ_0 + \sum_{k∉S} \tilde λ_k` up to rounding.  Site
    precisions are ≥ 0 (checked on the wire), so :math:`s_{-S} ≥ δ` in exact arithmetic.

``bayes-admm`` — ``dual`` (default), ``site`` (ρλ̃ₖ, the stored last site) and ``corrected-dual``
    Client k solves (dividing its objective by ρ) the local problem with prior πₖ = λ̄ − λ̂ₖ/ρ and
    ess = Nₖ/(τρ), and sends the site λ̃ₖ = λₖ − πₖ.  Write :math:`g_k = ρ\tilde λ_k` for the client's data
    term at temperature τ alone (exactly :math:`N_k H_k/τ` in the conjugate case; the IVON site
    :math:`N_k h_k/τ` in general).  Then, with λ̄⁻ the global that client k was configured with,

    .. math::  λ_k = \bar λ^- - \hat λ_k^-/ρ + g_k/ρ, \qquad
               \hat λ_k = \hat λ_k^- + γρ(λ_k - \bar λ^-)
               \;\Rightarrow\; g_k = \hat λ_k + (1 - γ)ρ(λ_k - \bar λ^-).

    * At the ADMM fixed point (λₖ = λ̄ for all k) the dual update is stationary, the server equation gives
      λ̄ = λ₀ + Σₖ λ̂ₖ and λ̂ₖ = gₖ: **the dual plays the role of the site** (``dual``: ĝₖ = λ̂ₖ).
    * Off the fixed point (finitely many rounds, damping γ < 1) the dual is an exponential moving average of
      gₖ that lags behind it by (1−γ)ρ(λₖ − λ̄⁻).  λ̄⁻ is not in the checkpoint (only the latest state is), so
      ``corrected-dual`` uses the stored global λ̄ in its place:
      :math:`\hat g_k = \hat λ_k + (1-γ)ρ(λ_k - \bar λ)`.  It is exact for γ = 1 (no correction) and, for
      γ < 1, exact once the global is stationary (λ̄ = λ̄⁻); it reduces to ``dual`` at the fixed point.
      Assumption: full participation, so every stored λₖ belongs to the last round (a stale λₖ of an absent
      client was formed against an older global and the correction is then only approximate).
    * Why :math:`λ̄ − \sum_{k∈S} \hat g_k` and not the server formula with the removed clients' terms dropped
      and K reduced: with λₖ held fixed that formula is one server step,
      :math:`(1-α')λ̄ + α'(λ_0 + \sum_{k∉S} g_k)` with α' = 1/(1+ρ(K−|S|)) (substitute λₖ from above),
      which moves only a fraction α' (≈ 0.18 for ρ = 0.5, K = 10) of the way to the answer; its fixed point
      is :math:`λ_0 + \sum_{k∉S} g_k`, which is what we estimate — anchored at the trained λ̄ so that
      removing nothing changes nothing and a run that has not converged keeps its own (shared) error.
    * ``site`` reads gₖ = ρλ̃ₖ from the site the client last sent (stored since sites are kept): exact on the
      conjugate model at the fixed point for any γ, safe prior or participation.  On networks one IVON site is
      a noisy estimate of gₖ and the dual, an average over rounds, is the better one; the default is measured
      (``docs/whatif.md``: same ranking of clients, magnitudes 140× closer to retraining).

Validity.  λ₋S keeps every precision ≥ δ, the prior's, by construction: the bounded step back
λ − β⊙Σ_{k∈S} ĝₖ (:mod:`fedbayes.whatif.removal`), reported per answer; ``fallback=False`` raises
:class:`InvalidPosteriorError` where any damping would be needed.  Site rules need none in exact arithmetic;
a bayes-admm estimate can (duals and sites may be large or negative).

Refinement (``refine_rounds`` > 0, :func:`refine`): R rounds of the rule over the remaining clients with the
removed clients' state deleted, from the trained global (default) or from λ₋S.

Retraining for verification ("client k had never taken part") runs the engine's round loop on a rule built
over the K' remaining clients (:func:`run_federation`): same data, partition over all K, initialisation,
participants and per-client seeds.  For the site rules it is bit-identical to the engine with
``exclude-clients`` (tested); for bayes-admm the engine's ``exclude-clients`` still counts excluded clients in
K (α = 1/(1+ρK)) and as λ₀ in the mean over clients, whose fixed point is λ₀ + Σ_{k∉S} gₖ/(1 + ρ|S|) rather
than λ₀ + Σ_{k∉S} gₖ — see ``docs/whatif.md`` for the engine change that removes the difference.

The package: :mod:`~fedbayes.whatif.removal` (contributions, removal, validity), :mod:`~fedbayes.whatif.runs`
(loading a run, retraining without clients, compatibility; any posterior is evaluated by the engine's own
:func:`fedbayes.rounds.evaluate_posterior_on`), :mod:`~fedbayes.whatif.ops` (whatif, influence, forget, merge
and their answer folders), :mod:`~fedbayes.whatif.reliability` (the note every answer carries: the run against the
range docs/whatif.md measured — rounds, clients, whether it settled, how much of the global the contributions
account for, the step back's damping — with warnings and a suggestion) and :mod:`~fedbayes.whatif.stats` (the
diagonal-Gaussian KL, Spearman's rank correlation with numpy ranks, metric deltas).  Merging runs from the same
prior: λ = λ_A + λ_B − λ₀.
"""

from __future__ import annotations

from fedbayes.whatif.ops import (
    EVAL_MODES,
    EXCLUDE_KEY,
    Answer,
    forget,
    forget_state,
    influence,
    merge,
    new_folder,
    publish,
    refine,
    retrain_without,
    staging,
    whatif,
    write_json,
    write_posterior_file,
)
from fedbayes.whatif.reliability import influence_note, merge_note, removal_note
from fedbayes.whatif.removal import (
    InvalidPosteriorError,
    Removal,
    RunMismatchError,
    StepBack,
    UnsupportedAlgorithmError,
    Validity,
    WhatIfError,
    bounded_step_back,
    check_gaussian,
    check_supported,
    client_contributions,
    estimators,
    merge_posteriors,
    posterior_without,
    repair_gaussian,
    supported_algorithms,
)
from fedbayes.whatif.runs import (
    LoadedRun,
    architecture,
    build_federation,
    check_compatible,
    evaluate_posterior,
    load_run,
    parse_clients,
    run_federation,
    same_partition,
)
from fedbayes.whatif.stats import deltas, kl_diag, rankdata, spearman

__all__ = [
    "EVAL_MODES", "EXCLUDE_KEY", "Answer", "InvalidPosteriorError", "LoadedRun", "Removal", "RunMismatchError",
    "StepBack", "UnsupportedAlgorithmError", "Validity", "WhatIfError", "architecture", "bounded_step_back",
    "build_federation", "check_compatible", "check_gaussian", "check_supported", "client_contributions", "deltas",
    "estimators", "evaluate_posterior", "forget", "forget_state", "influence", "influence_note", "kl_diag",
    "load_run", "merge", "merge_note", "merge_posteriors", "new_folder", "parse_clients", "posterior_without",
    "publish", "rankdata", "refine", "removal_note", "repair_gaussian", "retrain_without", "run_federation",
    "same_partition", "spearman", "staging", "supported_algorithms", "whatif", "write_json", "write_posterior_file",
]
