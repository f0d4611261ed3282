"""Forget objectives over any task's per-sample loss. Each returns a scalar to *minimise*."""

from __future__ import annotations

import torch
from torch import nn

from genunlearn.engine.loop import StepContext
from genunlearn.tasks.base import Batch, Task


def gradient_ascent(task: Task, model: nn.Module, batch: Batch) -> torch.Tensor:
    """``ga``: minus the mean loss on forget samples with their true labels."""
    return -task.loss(model, batch).mean()


def random_other_labels(labels: torch.Tensor, num_classes: int, ctx: StepContext) -> torch.Tensor:
    """A uniformly random label different from each true label ``[B]`` (shift by 1..K-1, mod K)."""
    shift = ctx.global_randint(num_classes - 1, len(labels)) + 1
    return (labels + shift) % num_classes

