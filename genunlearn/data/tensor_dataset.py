"""The dataset shape every genunlearn component relies on."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch.utils.data import Dataset


class LabeledDataset(Protocol):
    """A map-style dataset of ``(image[C, H, W] in [-1, 1], label)`` pairs.

    ``targets`` holds every label (so splits never load images); ``classes`` the
    class names by index. ``subclass_targets``/``subclasses`` are set when labels
    are super-classes built from finer classes (sub-class forgetting), else None.
    """

    targets: torch.Tensor
    classes: list[str]
    subclass_targets: torch.Tensor | None
    subclasses: list[str] | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class LabeledTensorDataset(Dataset):
    """Images and labels held in memory as tensors."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        subclass_targets: torch.Tensor | None = None,
        subclasses: Sequence[str] | None = None,
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.subclass_targets = subclass_targets
        self.subclasses = list(subclasses) if subclasses is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])
