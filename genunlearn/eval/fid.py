"""FID between image sets, with torchmetrics' Fréchet distance over a chosen feature extractor.

The offline default for the digits presets is the task classifier's penultimate features (its
pre-logits), since Inception weights cannot be downloaded here.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

FEATURE_BATCH = 512


class ClassifierFeatures(nn.Module):
    """A timm-style classifier's pooled pre-logit features ``[B, num_features]`` for images in [-1, 1]."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.forward_head(self.classifier.forward_features(images), pre_logits=True)


def frechet_distance(real: torch.Tensor, generated: torch.Tensor, features: nn.Module) -> float:
    """FID between ``real`` and ``generated`` images ``[N, C, H, W]`` in [-1, 1] under ``features``, on its device."""
    device = next(features.parameters()).device
    metric = FrechetInceptionDistance(feature=features, normalize=True).to(device)
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), FEATURE_BATCH):
            metric.update(images[start : start + FEATURE_BATCH].to(device), real=is_real)
    return max(0.0, float(metric.compute()))  # identical sets can come out at -1e-13 from rounding
