"""Image-folder datasets: ``ROOT/{train,test}/<class>/<image>`` (CIFAR-10 or ImageNet exported to files).

Class indices follow ``ROOT/classes.txt`` (one folder name per line) when present, so an
exported dataset keeps its original label ids; otherwise the sorted folder names, as
torchvision's ImageFolder does. An optional ``ROOT/superclasses.json``
(``{"vehicles": ["car", "truck"], ...}``) makes the labels super-classes and keeps the
folder classes as sub-classes, for sub-class forgetting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from genunlearn.errors import UserError
from genunlearn.storage.content_hash import file_hashes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def default_transform(image_size: int, channels: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (shorter side), centre-crop, and scale to [-1, 1] with ``channels`` channels."""
    return T.Compose(
        [
            T.Grayscale(1) if channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize([0.5] * channels, [0.5] * channels),
        ]
    )


def folder_class_names(root: Path) -> list[str]:
    """Class folder names in label order (``classes.txt`` if present, else sorted)."""
    listing = root / "classes.txt"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    train = root / "train"
    return sorted(p.name for p in train.iterdir() if p.is_dir())


class ImageFolderDataset(Dataset):
    """One split (``train`` or ``test``) of an image-folder dataset, images loaded lazily."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.root = Path(root)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} does not exist; --data expects ROOT/train/<class>/ and ROOT/test/<class>/")
        folder_classes = folder_class_names(self.root)
        self.transform = transform
        self.paths: list[Path] = []
        folder_labels: list[int] = []
        for index, name in enumerate(folder_classes):
            class_dir = split_dir / name
            files = sorted(p for p in class_dir.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if class_dir.is_dir() else []
            self.paths += files
            folder_labels += [index] * len(files)
        if not self.paths:
            raise UserError(f"no images found under {split_dir}; expected {split_dir}/<class>/<image>.png")
        folder_targets = torch.tensor(folder_labels, dtype=torch.long)
        grouping = self.root / "superclasses.json"
        if grouping.is_file():
            self.classes, self.targets = _group_into_superclasses(json.loads(grouping.read_text()), folder_classes, folder_targets)
            self.subclasses, self.subclass_targets = folder_classes, folder_targets
        else:
            self.classes, self.targets = folder_classes, folder_targets
            self.subclasses, self.subclass_targets = None, None
        if len(self.classes) < 2:
            raise UserError(f"{split_dir} holds {len(self.classes)} class; a classifier, and forgetting, need at least two")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image), int(self.targets[index])
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path} is not a readable image ({type(exc).__name__}); replace or remove it") from None

    def fingerprint(self) -> str:
        """A short hash of every image's path under the root (its class folder) and content: changes when any image
        does, or moves to another class (contents are read once; see ``file_hashes``)."""
        digest = hashlib.sha256()
        for path, content in zip(self.paths, file_hashes(self.paths)):
            digest.update(f"{path.relative_to(self.root)}:{content}\n".encode())
        return digest.hexdigest()[:16]


def _group_into_superclasses(
    grouping: dict[str, list[str]], folder_classes: list[str], folder_targets: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    superclasses = list(grouping)
    super_of = {}
    for super_index, name in enumerate(superclasses):
        for sub in grouping[name]:
            super_of[sub] = super_index
    missing = [c for c in folder_classes if c not in super_of]
    if missing:
        raise UserError(f"superclasses.json does not place class folder(s) {missing[:3]}; add them to a super-class")
    lookup = torch.tensor([super_of[c] for c in folder_classes], dtype=torch.long)
    return superclasses, lookup[folder_targets]
