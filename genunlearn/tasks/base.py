"""The Task contract: a model plus how to compute its per-sample loss. Nothing about unlearning."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from genunlearn.data.tensor_dataset import LabeledDataset

ParameterScope = Literal["all", "batchnorm", "head"]
Batch = tuple[torch.Tensor, torch.Tensor]


class Task(Protocol):
    """What methods and evaluation see of a model."""

    name: str
    model: nn.Module
    train_data: LabeledDataset
    test_data: LabeledDataset
    num_classes: int
    cache_dir: Path | None

    def loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss ``[B]`` on ``batch`` (images, labels); ``labels`` replaces the batch's labels."""
        ...

    def fresh_model(self) -> nn.Module:
        """The same architecture, newly initialised (for ``retrain``)."""
        ...

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        """Named parameters in ``scope``."""
        ...
