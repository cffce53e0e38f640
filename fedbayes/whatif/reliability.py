r"""How far to trust a what-if answer: a note derived from the run itself, against what docs/whatif.md measured.

Every answer (``whatif``, ``influence``, ``forget``, ``merge``) carries a ``reliability`` note: the facts of the
run that decide whether the estimators are inside the conditions under which they were measured, a list of
warnings where they are not, and a suggestion.  No threshold here is a guess: each is a number that
``docs/whatif.md`` ("Benchmark: fedbayes bench whatif") measured, or that was measured on one of its cases.

**The measured range** (:data:`MEASURED_ROUNDS`, :data:`MEASURED_CLIENTS`): the benchmark's federations are
fmnist-10-het (10 clients, 50 rounds), fmnist-20-het (20 clients, 20 and 10 rounds) and fmnist-classes (10 clients,
30 rounds): 10–50 rounds, 10–20 clients.  Outside it nothing was measured.

**Has the global settled?** (:data:`MAX_SETTLE`)  The per-round relative change of the run's NLL
(``bma_test_nll``, else ``test_nll``) over its last :data:`SETTLE_WINDOW` rounds: |m_r − m_{r−w}| / (|m_r|·w)
(w shorter where fewer rounds were evaluated).  The youngest measured run, where the ``dual`` step back still
ranked clients about as well as a retraining with another seed (fmnist-20-het, 10 rounds: Spearman 0.80 against
a noise ceiling of 0.86, MAE 0.0072 against changes of 0.0093), moved 1.22 % per round over its last 3 rounds
(measured 2026-12-07 on that case's base run, seed 0, ``fedbayes run --preset fmnist-10-het --clients 20
--rounds 10 --algorithm bayes-admm``: accuracy 0.737 and NLL 0.667 as in the benchmark; posterior-average NLL
0.68966 at round 7, 0.66532 at round 10).

**How much of the global the contributions account for** (``coverage``, :data:`MIN_COVERAGE`).  Every estimator
removes ĝₖ from λ; at the fixed point Σₖ ĝₖ = λ − λ₀ (DESIGN §2; pvi and fedlap-cov keep it by construction).
``coverage`` = Σₖ Σᵢ ĝˢₖ,ᵢ / Σᵢ (sᵢ − δ) is the share of the global's data precision that the contributions
explain, and ``removed_precision_share`` the removed clients' part of it (compare with their share of the
examples).  On the same fmnist-20-het run the duals cover 0.450 (:data:`MIN_COVERAGE`: the measured value,
rounded down so that the measured case passes; ``site`` 0.69, ``corrected-dual`` 0.98).  bayes-admm's global is
built mostly from the clients' posteriors, λ̄ = (1 − α)·mean λₖ + α(λ₀ + Σλ̂ₖ), and the duals take rounds to
absorb the data terms at a small damping γ.  **The reproduced case** (issue 23: digits-10-het, 3 rounds,
γ = 0.001): the duals cover 0.006 of the global and client 9's dual 0.27 % of it, against 34 % of the examples
(486 of 1,438; its dual is 0.7 % of its last site ρλ̃₉, where on fmnist-20-het the duals are 84–98 % of theirs),
so the ``dual`` step back barely moves the global and predicts +0.000 accuracy where retraining loses 0.256.
That is not a bug but the estimator far outside the state it was measured in.

**The step back** (:data:`MAX_DAMPED_FRACTION`): the share of coordinates the bounded step back damped.  Measured:
``dual`` damped 0.2 of 178,110 coordinates per removal on fmnist-10-het (its ranking good), ``site`` 1,707 (its
magnitudes 4,000× off), and the class-per-client case, where the step back failed, 40; the limit 10⁻⁴ lies
between the good case and the failed ones.

**The removed clients' share of the data** (:data:`MAX_REMOVED_SHARE`): the largest single removal measured held
about a third of the examples (fmnist-10-het's client 9, 2,022 of 6,000 = 0.337; rounded to 0.34).

**Estimators whose sizes measured badly** (:data:`POOR_MAGNITUDE_ESTIMATORS`): bayes-admm's ``site`` and
``corrected-dual`` were 470–4,000× off in size on fmnist-10-het and fmnist-20-het (MAE 3.4–73 against changes of
0.007–0.018 in NLL; only on the class-per-client case were they not); their rankings are usable, their
magnitudes are not.

**What to do instead** (``suggest``).  On a settled run: ``--refine R`` (R = :data:`MEASURED_REFINE`, the
measured value), R rounds of the rule over the remaining clients from the trained global, which does not rely on
the contributions and got the sizes right for bayes-admm on every measured case (for pvi only on 20 clients; on
fmnist-10-het its refined answers stayed 10–100× too large); it costs about R/r of an r-round retraining.  On a
run that is still learning it does not help: the R rounds train the global on, and the answer compares a
further-trained network with the trained one.  Measured on the reproduced case: ``--refine 3`` predicts
+0.128 accuracy (−0.447 NLL) for removing client 9, where retraining gives −0.256 (+0.681); even against the
full run continued to round 6 (accuracy 0.864) its answer (0.891) says that removing client 9 helps.  There the
note suggests retraining (``--verify``: 14 s here, as long as ``--refine 3``'s 16 s) or training the run on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedbayes.algorithms import Algorithm
from fedbayes.gaussian import DiagGaussian
from fedbayes.whatif.removal import Removal, prior_precision

if TYPE_CHECKING:
    from fedbayes.whatif.runs import LoadedRun

__all__ = [
    "MAX_DAMPED_FRACTION", "MAX_REMOVED_SHARE", "MAX_SETTLE", "MEASURED_CLIENTS", "MEASURED_REFINE", "MEASURED_ROUNDS",
    "MIN_COVERAGE", "POOR_MAGNITUDE_ESTIMATORS", "SETTLE_WINDOW", "SOURCE", "coverage", "describe_note",
    "influence_note", "merge_note", "removal_note", "run_facts", "settle",
]

SOURCE = "docs/whatif.md (How far to trust an answer; Benchmark: fedbayes bench whatif)"
MEASURED_ROUNDS = (10, 50)
"""Rounds of the benchmark's federations (fmnist-20-het at 10 and 20, fmnist-classes 30, fmnist-10-het 50)."""
MEASURED_CLIENTS = (10, 20)
"""Clients of the benchmark's federations."""
MEASURED_REFINE = 3
"""The refinement rounds R the benchmark measured."""
MIN_COVERAGE = 0.449
"""Σₖ λ̂ₖ's precision / the global's data precision on fmnist-20-het after 10 rounds (measured 0.44998)."""
SETTLE_WINDOW = 3
"""Rounds over which the NLL's movement is measured."""
MAX_SETTLE = 0.0122
"""Per-round relative change of the NLL over the last 3 rounds of that run ((0.68966 − 0.66532)/0.66532/3)."""
MAX_DAMPED_FRACTION = 1e-4
"""Damped coordinates / all: ``dual`` on fmnist-10-het 1e-6 (good), fmnist-classes 2.2e-4 and ``site`` 1e-2 (bad)."""
MAX_REMOVED_SHARE = 0.34
"""The largest measured single removal's share of the examples (2,022 of 6,000)."""
POOR_MAGNITUDE_ESTIMATORS = {"bayes-admm": ("site", "corrected-dual")}
"""Estimators whose predicted sizes were 470–4,000× off on fmnist-10-het and fmnist-20-het."""


# ============================================================================================ facts of the run
def settle(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """How much the run's NLL moved at the end: from round r − :data:`SETTLE_WINDOW` (or the nearest later evaluated
    round; the one before r when none is that close) to the last evaluated round r, per round.

    Returns ``{"metric", "from_round", "to_round", "from", "to", "relative_per_round"}`` with
    relative_per_round = |to − from| / (|to|·(to_round − from_round)), or None with fewer than two evaluated rounds.
    """
    pts: list[tuple[int, float]] = []
    metric = ""
    for metric in ("bma_test_nll", "test_nll", "bma_val_nll", "val_nll"):
        pts = [(int(r["round"]), float(r[metric])) for r in rows if metric in r and r[metric] is not None
               and math.isfinite(float(r[metric]))]
        if pts:
            break
    if len(pts) < 2:
        return None
    r1, m1 = pts[-1]
    r0, m0 = next(((r, m) for r, m in pts[:-1] if r >= r1 - SETTLE_WINDOW), pts[-2])
    rel = abs(m1 - m0) / (max(abs(m1), 1e-12) * max(r1 - r0, 1))
    return {"metric": metric, "from_round": r0, "to_round": r1, "from": m0, "to": m1, "relative_per_round": rel}


def _prec_sum(g: DiagGaussian) -> float:
    return float(sum(float(v.to(torch.float64).sum()) for v in g.prec.values()))


def coverage(rule: Algorithm, contributions: Mapping[int, DiagGaussian], removed: Iterable[int] = ()
             ) -> dict[str, float]:
    """Σₖ Σᵢ ĝˢₖ,ᵢ / Σᵢ (sᵢ − δ) over every client (``coverage``) and over the ``removed`` slots
    (``removed_precision_share``): how much of the global's data precision the contributions account for."""
    glob = rule.global_posterior()
    assert glob is not None
    data = _prec_sum(glob) - prior_precision(rule) * glob.numel()
    den = data if data > 0 else math.nan
    total = sum(_prec_sum(g) for g in contributions.values())
    gone = sum(_prec_sum(contributions[s]) for s in set(removed) if s in contributions)
    return {"global_data_precision": data, "coverage": total / den, "removed_precision_share": gone / den}


def run_facts(run: LoadedRun) -> dict[str, Any]:
    """The run-level facts and warnings: rounds and clients against the measured range, whether it settled."""
    rounds, clients = run.round, len(run.active)
    st = settle(run.meta.get("metrics", []))
    warnings = []
    lo, hi = MEASURED_ROUNDS
    if not lo <= rounds <= hi:
        warnings.append(f"the run trained {rounds} round(s); the estimators were measured on runs of {lo}-{hi}")
    lo, hi = MEASURED_CLIENTS
    if not lo <= clients <= hi:
        warnings.append(f"the run has {clients} client(s); the estimators were measured on {lo}-{hi}")
    if st is None:
        warnings.append("fewer than two evaluated rounds: whether the global has settled is unknown")
    elif st["relative_per_round"] > MAX_SETTLE:
        warnings.append(f"the global has not settled: {st['metric']} moved {st['relative_per_round']:.1%} per "
                        f"round at the end ({st['from']:.4g} at round {st['from_round']} -> {st['to']:.4g} at "
                        f"round {st['to_round']}); the measured runs moved <= {MAX_SETTLE:.2%}")
    facts = {"algorithm": run.algorithm, "rounds": rounds, "measured_rounds": list(MEASURED_ROUNDS),
             "clients": clients, "measured_clients": list(MEASURED_CLIENTS), "settle": st,
             "max_measured_settle": MAX_SETTLE}
    return {"facts": facts, "warnings": warnings}


# ============================================================================================ the notes
def _suggest(facts: Mapping[str, Any], refine_rounds: int) -> str:
    """What to do about a warned answer: retrain where the run is still learning (refining would add training to
    the comparison), else refine by the measured R (module docstring)."""
    rounds, r = int(facts["rounds"]), MEASURED_REFINE
    st = facts.get("settle")
    if st is None or st["relative_per_round"] > MAX_SETTLE:
        return (f"the run is still learning, so R more rounds (--refine R) would add R rounds of training to the "
                f"comparison (docs/whatif.md, How far to trust an answer); retrain without the client(s) instead "
                f"(--verify: {rounds} round(s), about the cost of --refine {rounds}) or train the run on (fedbayes run "
                f"--resume DIR --rounds N) and ask again")
    if refine_rounds > 0:
        return f"check the answer against a retraining (--verify): about {rounds / refine_rounds:.1f}x this refinement"
    return (f"--refine {r}: {r} rounds of the rule without the removed client(s) from the trained global (it does "
            f"not rely on the contributions; for bayes-admm its sizes were right on every measured case), about "
            f"{r / max(rounds, 1):.0%} of a retraining (--verify)")


def removal_note(run: LoadedRun, removal: Removal, refine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The reliability note of an answer that removes ``removal.slots`` from ``run`` (JSON-ready).

    Fields: ``ok`` (no warning), ``warnings``, ``suggest`` (None when ok), ``facts`` (rounds, clients, settle),
    ``removal`` (removed share of the examples, the contributions' ``coverage`` and the removed clients'
    precision share, the step back's damped fraction, each beside its measured limit)
    and ``source``.  With a refinement from the trained global the contribution and step-back facts are reported
    but do not bear on the answer, so they raise no warning.
    """
    rule = run.rule
    base = run_facts(run)
    warnings: list[str] = list(base["warnings"])
    refine_rounds = int((refine or {}).get("rounds", 0))
    uses_step_back = refine_rounds == 0 or (refine or {}).get("start") == "step-back"
    ids = [c for c in run.active if run.slots([c])[0] in removal.slots] if removal.slots else []
    n_all = sum(run.num_examples(c) for c in run.active)
    share = sum(run.num_examples(c) for c in ids) / max(n_all, 1)
    cov = coverage(rule, rule.contributions(removal.estimator), removal.slots)
    damped_fraction = removal.step.damped / max(removal.step.numel, 1)
    facts: dict[str, Any] = {
        "estimator": removal.estimator, "removed_examples_share": share, "max_measured_share": MAX_REMOVED_SHARE,
        **cov, "min_measured_coverage": MIN_COVERAGE, "damped_fraction": damped_fraction,
        "max_measured_damped_fraction": MAX_DAMPED_FRACTION, "applies_to_answer": uses_step_back,
    }
    if share > MAX_REMOVED_SHARE:
        warnings.append(f"the removed client(s) hold {share:.0%} of the examples; the largest measured removal held "
                        f"{MAX_REMOVED_SHARE:.0%}")
    if uses_step_back:
        if cov["coverage"] < MIN_COVERAGE:
            warnings.append(f"the '{removal.estimator}' contributions account for {cov['coverage']:.1%} of the "
                            f"global's data precision (measured >= {MIN_COVERAGE:.1%}): the step back can move the "
                            f"global only that far")
        if damped_fraction > MAX_DAMPED_FRACTION:
            warnings.append(f"the step back was bounded on {removal.step.damped} of {removal.step.numel} coordinates "
                            f"({damped_fraction:.2%}; measured good <= {MAX_DAMPED_FRACTION:.0e}): the contribution "
                            f"claims more certainty than the global holds there")
        if removal.estimator in POOR_MAGNITUDE_ESTIMATORS.get(rule.name, ()):
            warnings.append(f"'{removal.estimator}' predicted sizes 470-4000x too large on the measured fmnist "
                            f"cases; use its ranking only")
    return {"ok": not warnings, "warnings": warnings,
            "suggest": None if not warnings else _suggest(base["facts"], refine_rounds),
            "facts": base["facts"], "removal": facts, "source": SOURCE}


def influence_note(run: LoadedRun, notes: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The note of an influence table: the run's facts, and every client's warnings (``notes``: client id -> its
    :func:`removal_note`), a warning shared by all clients once, the others prefixed by their client."""
    base = run_facts(run)
    lists = {c: [w for w in n["warnings"] if w not in base["warnings"]] for c, n in notes.items()}
    shared = [w for w in next(iter(lists.values()), []) if all(w in ws for ws in lists.values())]
    warnings = list(base["warnings"]) + shared
    warnings += [f"client {c}: {w}" for c, ws in lists.items() for w in ws if w not in shared]
    suggest = next((n["suggest"] for n in notes.values() if n.get("suggest")), None)
    return {"ok": not warnings, "warnings": warnings,
            "suggest": (suggest or _suggest(base["facts"], 0)) if warnings else None,
            "facts": base["facts"], "clients": {c: n["removal"] for c, n in notes.items()}, "source": SOURCE}


def merge_note(a: LoadedRun, b: LoadedRun) -> dict[str, Any]:
    """The reliability note of a merge: each run's facts and warnings; merging was measured only on the conjugate
    model (exact there), never on a network."""
    fa, fb = run_facts(a), run_facts(b)
    warnings = [f"A: {w}" for w in fa["warnings"]] + [f"B: {w}" for w in fb["warnings"]]
    warnings.append("λ_A + λ_B − λ₀ is exact for conjugate models only; it was not measured on a network")
    return {"ok": False, "warnings": warnings,
            "suggest": "compare with a run on the union of the clients (--union DIR_C)",
            "facts": {"a": fa["facts"], "b": fb["facts"]}, "source": SOURCE}


def describe_note(note: Mapping[str, Any]) -> list[str]:
    """The note as lines to print (``[fedbayes] reliability: …``)."""
    if note["ok"]:
        f = note["facts"]
        return [f"[fedbayes] reliability: inside the measured range ({f['rounds']} rounds, {f['clients']} clients, "
                f"settled; {SOURCE})"]
    lines = [f"[fedbayes] reliability WARNING: {w}" for w in note["warnings"]]
    if note.get("suggest"):
        lines.append(f"[fedbayes] suggestion: {note['suggest']}")
    return lines
