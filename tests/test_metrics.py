"""Metrics on hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch

from torch import nn

from genunlearn.eval.classify import accuracy, class_metrics, evaluate_classifier
from genunlearn.eval.mia import member_rate, softmax_entropy


def test_accuracy_and_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.5)  # ties go to class 0
    assert accuracy(logits[:0], torch.tensor([], dtype=torch.long)) is None
    assert softmax_entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert softmax_entropy(torch.tensor([[100.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_generated_class_metrics_by_hand():
    """Samples that are their own logits: accuracy, mean entropy (nats) and mean probability of the class."""
    samples = {0: torch.tensor([[2.0, 0.0], [0.0, 1.0]]), 1: torch.tensor([[0.0, 3.0], [1.0, 1.0]])}
    metrics = class_metrics(nn.Identity(), samples, torch.device("cpu"))

    def entropy(a: float, b: float) -> float:
        p = math.exp(a) / (math.exp(a) + math.exp(b))
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  p(class) of two logits differing by x
    assert metrics[0]["accuracy"] == pytest.approx(0.5) and metrics[1]["accuracy"] == pytest.approx(0.5)  # tie -> class 0
    assert metrics[0]["entropy"] == pytest.approx((entropy(2, 0) + entropy(0, 1)) / 2)
    assert metrics[0]["probability"] == pytest.approx((sigmoid(2) + sigmoid(-1)) / 2)
    assert metrics[1]["probability"] == pytest.approx((sigmoid(3) + 0.5) / 2)
    assert metrics[1]["entropy"] == pytest.approx((entropy(0, 3) + math.log(2)) / 2)


def test_member_rate_separates_low_from_high_entropy():
    members = torch.linspace(0.0, 0.1, 50).double()
    non_members = torch.linspace(1.0, 1.2, 50).double()
    targets = torch.tensor([0.05, 0.02, 1.1, 0.08]).double()
    assert member_rate(members, non_members, targets) == pytest.approx(0.75)


def test_classifier_metrics_are_fractions(cnn_task, class3_split, accelerator):
    metrics = evaluate_classifier(cnn_task.model, class3_split, accelerator)
    for key in ("forget_acc", "forget_test_acc", "retain_acc", "test_acc", "mia"):
        assert 0.0 <= metrics[key] <= 1.0
