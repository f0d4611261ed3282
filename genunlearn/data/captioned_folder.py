"""User images with captions for a text-to-image erasure: a folder in the Hugging Face ``imagefolder`` layout that
diffusers' text-to-image training script reads (images beside a ``metadata.jsonl`` of ``{"file_name", "text"}`` lines,
or a ``metadata.csv`` with those columns; ``caption`` is accepted for ``text``)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

from genunlearn.data.folders import default_transform, read_utf8
from genunlearn.errors import UserError
from genunlearn.storage.cache import cache_root
from genunlearn.storage.content_hash import file_hashes

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("text", "caption")


def read_captioned_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """``[(image path, caption)]`` in the metadata's order; a UserError naming the fix for a missing folder, metadata
    file, image or caption."""
    folder = Path(folder)
    metadata = next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)
    if metadata is None:
        raise UserError(f"--data {folder}: no metadata.jsonl or metadata.csv; captioned images need one "
                        '({"file_name": "0.png", "text": "a caption"} per line)')
    rows = _metadata_rows(metadata)
    root = folder.resolve()
    pairs = []
    for number, row in enumerate(rows, start=1):
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None) if isinstance(row, dict) else None
        if caption is None or not isinstance(row.get("file_name"), str):
            raise UserError(f"{metadata}: entry {number} needs a file_name and a text (caption)")
        path = folder / row["file_name"]
        if not path.resolve().is_relative_to(root):
            raise UserError(f"{metadata}: entry {number} names {row['file_name']}, which is outside {folder}; "
                            "name images inside the folder")
        if not path.is_file():
            raise UserError(f"{metadata}: entry {number} names {row['file_name']}, which is not in {folder}")
        pairs.append((path, " ".join(caption.split())))
    if not pairs:
        raise UserError(f"{metadata} lists no image")
    return pairs


def _metadata_rows(metadata: Path) -> list:
    """The rows of ``metadata.jsonl`` (one JSON value per line) or ``metadata.csv`` (dicts by header)."""
    text = read_utf8(metadata)
    if metadata.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            raise UserError(f"{metadata}: line {number} is not JSON; write one object per line") from None
    return rows


def captioned_fingerprint(pairs: list[tuple[Path, str]], cache_dir: str | Path | None = None) -> str:
    """A 12-hex digest of the captioned images: every caption and every image's content, in order (contents hashed
    once, remembered in ``cache_dir``'s cache; see ``file_hashes``)."""
    digest = hashlib.sha256()
    for (_, caption), content in zip(pairs, file_hashes([path for path, _ in pairs], cache_root(cache_dir))):
        digest.update(f"{caption}\0{content}\n".encode())
    return digest.hexdigest()[:12]


def load_images(paths: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """The images at ``paths`` as ``[N, C, S, S]`` in [-1, 1] at ``shape`` (``C`` 1: grey, 3: RGB; square, ``S``),
    prepared as the image folders are (``default_transform``: shorter side resized, centre-cropped)."""
    channels, height, width = shape
    if height != width:
        raise ValueError(f"images are loaded square; got {height}x{width}")
    transform = default_transform(height, channels)
    return torch.stack([transform(Image.open(path)) for path in paths])
