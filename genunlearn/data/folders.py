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
from genunlearn.storage.cache import cache_root
from genunlearn.storage.content_hash import file_hashes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def default_transform(image_size: int, channels: int, mean: list[float] | None = None,
                      std: list[float] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (shorter side), centre-crop, and normalise ``channels`` channels with ``mean``/``std`` per channel on
    [0, 1] pixels (default 0.5, 0.5: to [-1, 1]); its ``description`` names it in dataset fingerprints."""
    mean, std = list(mean or [0.5] * channels), list(std or [0.5] * channels)
    transform = T.Compose(
        [
            T.Grayscale(1) if channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    scaled = "to-[-1,1]" if mean == std == [0.5] * channels else f"mean{mean}-std{std}"
    transform.description = f"resize-centre-crop-{image_size}-channels{channels}-{scaled}"
    return transform


def transform_description(transform: Callable) -> str:
    """What a transform computes, for fingerprints: its ``description``, else its ``repr`` (user transforms)."""
    return getattr(transform, "description", None) or repr(transform)


def folder_class_names(root: Path) -> list[str]:
    """Class folder names in label order (``classes.txt`` if present, else sorted); a UserError for a listing that
    names a folder twice or a folder ``ROOT/train`` lacks."""
    listing, train = root / "classes.txt", root / "train"
    if not listing.is_file():
        return sorted(p.name for p in train.iterdir() if p.is_dir())
    names = [line.strip() for line in read_utf8(listing).splitlines() if line.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{listing} names {repeated[0]!r} more than once; list each class folder once")
    outside = [n for n in names if Path(n).name != n or n in (".", "..")]
    if outside:
        raise UserError(f"{listing} names {outside[0]!r}, which is not a folder name inside {train}; list class folder names only")
    missing = [n for n in names if not (train / n).is_dir()]
    if missing:
        raise UserError(f"{listing} names {missing[0]!r}, which is not a folder under {train}; fix the listing or add the folder")
    return names


def read_utf8(path: Path) -> str:
    """``path``'s text; a UserError naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None


def class_images(class_dir: Path) -> list[Path]:
    """The images in one class folder, sorted; a UserError for an entry named like an image that is not a readable
    file (a folder, a broken or looping link), or for a folder with no images."""
    if not class_dir.is_dir():
        raise UserError(f"{class_dir} does not exist; every class needs a folder with images in train/ and test/")
    files = []
    for path in sorted(class_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.is_file():
            what = "a folder" if path.is_dir() else "a broken or looping link"
            raise UserError(f"{path} is {what}, not an image; remove or rename it")
        files.append(path)
    if not files:
        raise UserError(f"{class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the class")
    return files


class ImageFolderDataset(Dataset):
    """One split (``train`` or ``test``) of an image-folder dataset, images loaded lazily through ``transform`` (None:
    the listing alone); content hashes remembered in ``cache_dir``'s cache."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.root, self.cache_dir = Path(root), cache_dir
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} does not exist; --data expects ROOT/train/<class>/ and ROOT/test/<class>/")
        folder_classes = folder_class_names(self.root)
        self.transform = transform
        self.paths: list[Path] = []
        folder_labels: list[int] = []
        if not folder_classes:
            raise UserError(f"no class folders found under {split_dir}; expected {split_dir}/<class>/<image>.png")
        for index, name in enumerate(folder_classes):
            files = class_images(split_dir / name)
            self.paths += files
            folder_labels += [index] * len(files)
        folder_targets = torch.tensor(folder_labels, dtype=torch.long)
        grouping = self.root / "superclasses.json"
        if grouping.is_file():
            self.classes, self.targets = _group_into_superclasses(_read_grouping(grouping), folder_classes, folder_targets)
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
        """A short hash of what the model sees: the class list and label mapping (``classes.txt``, the grouping),
        the transform, and every image's path under the root, label and content. It changes when any image does or
        moves to another class, and when classes are added, reordered or regrouped (contents are read once; see
        ``file_hashes``)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.classes, self.subclasses, transform_description(self.transform)]).encode())
        hashes = file_hashes(self.paths, cache_root(self.cache_dir))
        for path, label, content in zip(self.paths, self.targets.tolist(), hashes):
            digest.update(f"{path.relative_to(self.root)}:{label}:{content}\n".encode())
        return digest.hexdigest()[:16]


def image_folder_splits(root: str | Path, transform: Callable[[Image.Image], torch.Tensor] | None = None,
                        cache_dir: str | Path | None = None) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """``(train, test)`` of an image-folder dataset, both holding the same classes; with no ``transform`` a check of
    the folders alone (every listed class has images, the listing and grouping are valid), run before any work."""
    train = ImageFolderDataset(root, "train", transform, cache_dir)
    test = ImageFolderDataset(root, "test", transform, cache_dir)
    if test.classes != train.classes or test.subclasses != train.subclasses:
        raise UserError(f"{root}/test holds other classes than {root}/train; give both the same class folders")
    return train, test


def _read_grouping(path: Path) -> dict[str, list[str]]:
    """``superclasses.json``: an object of super-class name to a list of class folder names."""
    try:
        grouping = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}); it maps super-class names to lists of class folders") from None
    if not (isinstance(grouping, dict) and grouping
            and all(isinstance(v, list) and v and all(isinstance(c, str) for c in v) for v in grouping.values())):
        raise UserError(f'{path} must map super-class names to non-empty lists of class folders, e.g. {{"vehicles": ["car", "truck"]}}')
    return grouping


def _group_into_superclasses(
    grouping: dict[str, list[str]], folder_classes: list[str], folder_targets: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    superclasses = list(grouping)
    super_of: dict[str, int] = {}
    for super_index, name in enumerate(superclasses):
        for sub in grouping[name]:
            if sub in super_of:
                raise UserError(f"superclasses.json places class folder {sub!r} in two super-classes; place it in one")
            if sub not in folder_classes:
                raise UserError(f"superclasses.json names {sub!r}, which is not a class folder; fix the name")
            super_of[sub] = super_index
    missing = [c for c in folder_classes if c not in super_of]
    if missing:
        raise UserError(f"superclasses.json does not place class folder(s) {missing[:3]}; add them to a super-class")
    lookup = torch.tensor([super_of[c] for c in folder_classes], dtype=torch.long)
    return superclasses, lookup[folder_targets]
