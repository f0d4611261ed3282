"""PNG sample grids: one row per class, the same seeds before and after unlearning."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from genunlearn.storage.files import make_readable


def save_class_grid(rows: list[torch.Tensor], path: Path, scale: int = 4) -> None:
    """Write ``rows`` (one ``[n, C, H, W]`` tensor in [-1, 1] per class, equal n) as a PNG grid, upscaled
    ``scale`` times (nearest) so that 8x8 samples are visible; written atomically."""
    images = torch.cat(rows)
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(handle)
    save_image((images + 1) / 2, staging, nrow=len(rows[0]), padding=2, pad_value=0.5)
    make_readable(Path(staging))
    os.replace(staging, path)
