"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedbayes.metrics import classification_metrics, expected_calibration_error, regression_metrics


def test_classification_metrics_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(probs, y)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.3) + math.log(0.8)) / 4)
    # Brier: (0.01+0.01) + (0.36+0.36) + (0.49+0.49) + (0.04+0.04) = 1.8 -> /4
    assert m["brier"] == pytest.approx(1.8 / 4)
    # ECE (15 bins): confidences 0.9 (correct), 0.6 (wrong), 0.7 (wrong), 0.8 (correct), each its own bin:
    # (|1-0.9| + |0-0.6| + |0-0.7| + |1-0.8|)/4 = 1.6/4
    assert m["ece"] == pytest.approx(0.4)


def test_ece_shared_bin() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.96, 0.04]])
    y = torch.tensor([0, 1])
    # one bin (0.933, 1]: acc 0.5, conf 0.955
    assert expected_calibration_error(probs, y) == pytest.approx(0.455)


def test_regression_metrics_by_hand() -> None:
    m = regression_metrics(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0]))
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    nll = (0.5 * math.log(2 * math.pi) + 0.5 + 0.5 * math.log(8 * math.pi)) / 2
    assert m["nll"] == pytest.approx(nll)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError):
        classification_metrics(torch.ones(3, 2) / 2, torch.zeros(2, dtype=torch.long))
