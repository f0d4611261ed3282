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

from genunlearn.data.folders import default_transform
from genunlearn.errors import UserError

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
    if metadata.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"{metadata}: line {exc.lineno} is not JSON; write one object per line") from None
    else:
        with metadata.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    pairs = []
    for number, row in enumerate(rows, start=1):
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
        if "file_name" not in row or caption is None:
            raise UserError(f"{metadata}: entry {number} needs a file_name and a text (caption)")
        path = folder / row["file_name"]
        if not path.is_file():
            raise UserError(f"{metadata}: entry {number} names {row['file_name']}, which is not in {folder}")
        pairs.append((path, " ".join(caption.split())))
    if not pairs:
        raise UserError(f"{metadata} lists no image")
    return pairs


def captioned_fingerprint(pairs: list[tuple[Path, str]]) -> str:
    """A 12-hex digest of the captioned images: every caption and every image's bytes, in order."""
    digest = hashlib.sha256()
    for path, caption in pairs:
        digest.update(caption.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def load_images(paths: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """The images at ``paths`` as ``[N, C, S, S]`` in [-1, 1] at ``shape`` (``C`` 1: grey, 3: RGB; square, ``S``),
    prepared as the image folders are (``default_transform``: shorter side resized, centre-cropped)."""
    channels, height, width = shape
    if height != width:
        raise ValueError(f"images are loaded square; got {height}x{width}")
    transform = default_transform(height, channels)
    return torch.stack([transform(Image.open(path)) for path in paths])
