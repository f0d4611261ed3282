"""Datasets the user already holds as genunlearn ``LabeledDataset``s: torchvision-style (``targets``), ``TensorDataset``,
``Subset``s of those, any map-style ``(image, label)`` dataset, and Hugging Face ``datasets.Dataset`` tables."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def as_labeled_dataset(
    dataset: Dataset,
    classes: Sequence[str] | None = None,
    *,
    transform: Callable | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> LabeledDataset:
    """``dataset`` as genunlearn reads data: every label known up front (``targets [N]``) and the class names.

    Labels come from ``dataset.targets`` (torchvision), a ``TensorDataset``'s second tensor, a Hugging Face table's
    label column, or one pass over the items. Class names: ``classes``, else the dataset's own (``classes``, a
    ``ClassLabel``'s names), else ``"0" .. "K-1"``. Images pass through unchanged, except a Hugging Face table's:
    ``transform`` (default: to a ``[C, H, W]`` tensor in [-1, 1]). A dataset that already is one is returned as is."""
    if _is_labeled(dataset) and classes is None:
        return dataset
    if hasattr(dataset, "column_names") and hasattr(dataset, "features"):
        return _HuggingFaceDataset(dataset, classes, transform, image_column, label_column)
    targets = _targets(dataset)
    return UserDataset(dataset, targets, _class_names(classes, getattr(dataset, "classes", None), targets))


class UserDataset(Dataset):
    """A map-style ``(image, label)`` dataset with its labels (``targets [N]``) and class names alongside."""

    subclass_targets = None
    subclasses = None

    def __init__(self, dataset: Dataset, targets: torch.Tensor, classes: list[str]) -> None:
        self.dataset = dataset
        self.targets = targets
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[index]
        return image, int(self.targets[index])


class _HuggingFaceDataset(UserDataset):
    """A ``datasets.Dataset`` with an image and a label column; images go through ``transform``."""

    def __init__(self, table, classes, transform, image_column, label_column) -> None:
        label_column = label_column or _column(table, LABEL_COLUMNS, "ClassLabel", "label")
        self.image_column = image_column or _column(table, IMAGE_COLUMNS, "Image", "image")
        self.transform = transform or _to_unit_range
        targets = torch.as_tensor(table[label_column], dtype=torch.long)
        names = getattr(table.features[label_column], "names", None)
        super().__init__(table, targets, _class_names(classes, names, targets))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.dataset[int(index)][self.image_column]), int(self.targets[index])


_to_unit_range = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])


def _is_labeled(dataset) -> bool:
    return (isinstance(getattr(dataset, "targets", None), torch.Tensor) and isinstance(getattr(dataset, "classes", None), list)
            and hasattr(dataset, "subclass_targets"))


def _targets(dataset: Dataset) -> torch.Tensor:
    """Every label of ``dataset`` as a ``[N]`` long tensor, without loading images where the dataset keeps them apart."""
    if isinstance(dataset, Subset):
        return _targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise UserError(f"a TensorDataset of (images, labels) is needed, this one holds {len(dataset.tensors)} tensors")
        targets = dataset.tensors[1]
    elif getattr(dataset, "targets", None) is not None:
        targets = dataset.targets
    else:
        targets = [dataset[i][1] for i in range(len(dataset))]
    targets = torch.as_tensor(targets)
    if targets.ndim != 1 or targets.is_floating_point() or len(targets) != len(dataset):
        raise UserError(f"labels must be one class id per sample; got {tuple(targets.shape)} {targets.dtype} for {len(dataset)} samples")
    if len(targets) and int(targets.min()) < 0:
        raise UserError(f"labels must be class ids 0..K-1, found {int(targets.min())}")
    return targets.long()


def _class_names(given: Sequence[str] | None, own: Sequence | None, targets: torch.Tensor) -> list[str]:
    names = list(given if given is not None else own if own is not None else [])
    if not names:
        names = [str(i) for i in range(int(targets.max()) + 1 if len(targets) else 0)]
    if len(targets) and int(targets.max()) >= len(names):
        raise UserError(f"label {int(targets.max())} has no class name: {len(names)} classes given")
    return [str(name) for name in names]


def _column(table, candidates: tuple[str, ...], feature_type: str, what: str) -> str:
    typed = [name for name, feature in table.features.items() if type(feature).__name__ == feature_type]
    found = typed or [name for name in candidates if name in table.column_names]
    if not found:
        raise UserError(f"no {what} column in {table.column_names}; pass {what}_column=")
    return found[0]
