"""The bounded step back of what-if (:func:`fedbayes.whatif.removal.bounded_step_back`) on numbers derived by hand:
βᵢ = 1 where the full step keeps sᵢ − ĝˢᵢ ≥ δ, βᵢ = (sᵢ − δ)/ĝˢᵢ where it would not, βᵢ = 0 where the trained
global is already below δ (a bayes-admm global can be), and a negative contribution (bayes-admm's signed sites).

Caught mutation (β not clamped to [0, 1]: where the global precision is below the prior's, (sᵢ − δ)/ĝˢᵢ < 0 and
the "step back" *adds* precision, up to δ, to a coordinate the data never made that certain)::

    -        beta = torch.where(short, ratio.clamp(0.0, 1.0).nan_to_num(0.0), torch.ones_like(s))
    +        beta = torch.where(short, ratio.nan_to_num(0.0), torch.ones_like(s))

fails ``test_step_back_by_hand`` (coordinate 2: precision 1 instead of 0.5, β −0.25 instead of 0).  Clamping at 1
only is an equivalent mutant: a coordinate is damped only where sᵢ − ĝˢᵢ < δ, where (sᵢ − δ)/ĝˢᵢ < 1 already.
"""

from __future__ import annotations

import pytest
import torch

from fedbayes.gaussian import DiagGaussian
from fedbayes.whatif import bounded_step_back

DELTA = 1.0


def _g(eta: list[float], prec: list[float], b: tuple[float, float] = (4.0, 2.0)) -> DiagGaussian:
    return DiagGaussian({"a": torch.tensor(eta, dtype=torch.float64), "b": torch.tensor([b[0]], dtype=torch.float64)},
                        {"a": torch.tensor(prec, dtype=torch.float64), "b": torch.tensor([b[1]], dtype=torch.float64)})


def test_step_back_by_hand() -> None:
    """δ = 1; per coordinate of ``a`` (global (η, s), contribution (ĝ^η, ĝˢ)) and what the answer must be:

    0. (10, 5) − (3, 2): full step, s − ĝˢ = 3 ≥ 1: (7, 3), β = 1.
    1. (10, 5) − (3, 8): the full step would leave −3; β = (5 − 1)/8 = 0.5, s = 5 − 4 = 1 = δ, at the trained
       mean 10/5 = 2: η = 2.
    2. (1, 0.5) − (3, 2): the global is below δ already; (0.5 − 1)/2 = −0.25 clamps to β = 0: unchanged (1, 0.5).
    3. (1, 0.5) − (−1, −0.25): a negative contribution, global below δ: removing it *adds* precision,
       s − ĝˢ = 0.75, still < δ, so no β reaches δ and β = 1 (the most precision [0, 1] allows): s = 0.75 at the
       trained mean 2, η = 1.5 (a coordinate that ends below δ keeps the trained mean).
    4. (4, 2) − (−2, −1): a negative contribution above δ: the full step (6, 3), β = 1.

    Parameter ``b``: (4, 2) − (1, 0.5): full step (3, 1.5).  StepBack: 6 coordinates, 2 damped (both in ``a``),
    1 not moved at all, β_min 0, β_mean (1 + 0.5 + 0 + 1 + 1 + 1)/6 = 0.75."""
    post = _g([10.0, 10.0, 1.0, 1.0, 4.0], [5.0, 5.0, 0.5, 0.5, 2.0])
    contrib = _g([3.0, 3.0, 3.0, -1.0, -2.0], [2.0, 8.0, 2.0, -0.25, -1.0], b=(1.0, 0.5))
    out, step = bounded_step_back(post, contrib, DELTA)
    assert out.prec["a"].tolist() == [3.0, 1.0, 0.5, 0.75, 3.0]
    assert out.eta["a"].tolist() == [7.0, 2.0, 1.0, 1.5, 6.0]
    assert out.prec["b"].tolist() == [1.5] and out.eta["b"].tolist() == [3.0]
    assert (step.numel, step.damped, step.zeroed, step.by_param) == (6, 2, 1, {"a": 2})
    assert step.beta_min == 0.0 and step.beta_mean == pytest.approx(0.75, abs=1e-15)
    assert not step.full and "2 of 6 coordinates damped" in step.describe()


@pytest.mark.parametrize("s", [0.25, 0.5, 0.999])
def test_a_global_below_the_prior_is_never_made_more_certain(s: float) -> None:
    """Wherever the trained global's precision s is below δ and the contribution is positive, the answer is the
    global itself (β = 0) whatever ĝ: removing data never adds certainty, and never moves the mean."""
    post = _g([2.0 * s] * 3, [s] * 3)
    contrib = _g([1.0, -4.0, 100.0], [1e-3, 1.0, 1e6], b=(0.0, 0.0))
    out, step = bounded_step_back(post, contrib, DELTA)
    assert torch.equal(out.prec["a"], post.prec["a"]) and torch.equal(out.eta["a"], post.eta["a"])
    assert step.zeroed == 3 and step.beta_min == 0.0 and step.by_param == {"a": 3}


def test_a_negative_contribution_is_removed_in_full_where_it_keeps_the_bound() -> None:
    """ĝˢ < 0 (a bayes-admm signed site): s − ĝˢ > s ≥ δ, so the whole contribution goes, precision and η alike —
    (η, s) = (3, 1.5) − (−0.5, −0.5) = (3.5, 2) — and nothing counts as damped."""
    post = _g([3.0], [1.5])
    contrib = _g([-0.5], [-0.5], b=(0.0, 0.0))
    out, step = bounded_step_back(post, contrib, DELTA)
    assert out.eta["a"].tolist() == [3.5] and out.prec["a"].tolist() == [2.0]
    assert out.eta["b"].tolist() == [4.0] and out.prec["b"].tolist() == [2.0]
    assert step.full and step.beta_mean == 1.0 and step.zeroed == 0
