"""Judging a class-conditional generator's fresh samples with ``eval.classify.class_metrics``."""

from __future__ import annotations

from accelerate import Accelerator
from torch import nn

from genunlearn.eval.classify import class_metrics
from genunlearn.models.pipeline import Pipeline
from genunlearn.models.sampling import sample_classes

def classify_generated(
    pipeline: Pipeline,
    classifier: nn.Module,
    classes: list[int],
    per_class: int,
    accelerator: Accelerator,
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """``class_metrics`` of freshly sampled classes."""
    samples = sample_classes(pipeline, classes, per_class, accelerator, guidance=guidance, steps=steps, seed=seed)
    return class_metrics(classifier, samples, accelerator.device)
