"""Metrics on hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch

from genunlearn.eval.classify import accuracy, classifier_metrics
from genunlearn.eval.mia import member_rate, softmax_entropy


def test_accuracy_and_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.5)  # ties go to class 0
    assert accuracy(logits[:0], torch.tensor([], dtype=torch.long)) is None
    assert softmax_entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert softmax_entropy(torch.tensor([[100.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_member_rate_separates_low_from_high_entropy():
    members = torch.linspace(0.0, 0.1, 50).double()
    non_members = torch.linspace(1.0, 1.2, 50).double()
    targets = torch.tensor([0.05, 0.02, 1.1, 0.08]).double()
    assert member_rate(members, non_members, targets) == pytest.approx(0.75)


def test_classifier_metrics_are_fractions(cnn_task, class3_split, accelerator):
    metrics = classifier_metrics(cnn_task.model, class3_split, accelerator)
    for key in ("forget_acc", "forget_test_acc", "retain_acc", "test_acc", "mia"):
        assert 0.0 <= metrics[key] <= 1.0
