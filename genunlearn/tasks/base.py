"""The Task contract: a model plus how to compute its per-sample loss. Nothing about unlearning."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from genunlearn.data.tensor_dataset import LabeledDataset

ParameterScope = str  # all, batchnorm, prompts, head, or a +-joined mix (models/peft.py)
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

    importance_loss_id: str

    def importance_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample loss ``[B]`` whose gradients measure weight importance (Fishers, saliency masks);
        ``importance_loss_id`` names it in cache keys."""
        ...

    def random_label_loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor, form: str = "eps_match") -> torch.Tensor:
        """Per-sample loss ``[B]`` pulling the batch towards the other ``labels`` (the ``rl`` objective)."""
        ...

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample loss used for (pre)training and retraining, with any training-time regularisation."""
        ...

    def fresh_model(self) -> nn.Module:
        """The same architecture, newly initialised (for ``retrain``)."""
        ...

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        """Named parameters in ``scope``."""
        ...
