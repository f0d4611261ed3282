"""Membership inference: softmax entropy as the feature, logistic regression with balanced classes."""

from __future__ import annotations

import numpy as np
import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` logits -> ``[N]`` entropy of the softmax, in nats."""
    log_probs = torch.log_softmax(logits.double(), dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def member_rate(members: torch.Tensor, non_members: torch.Tensor, targets: torch.Tensor) -> float:
    """Fit member (``members``, label 1) vs non-member (``non_members``, label 0) on 1-D features ``[N]``;
    return the fraction of ``targets`` predicted member."""
    from sklearn.linear_model import LogisticRegression  # imported on use: it takes a second

    features = torch.cat([members, non_members]).numpy().reshape(-1, 1)
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    attack = LogisticRegression(class_weight="balanced").fit(features, is_member)
    return float(attack.predict(targets.numpy().reshape(-1, 1)).mean())
