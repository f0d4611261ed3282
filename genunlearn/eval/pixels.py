"""Generated images as the pixels their saved PNGs hold: what image judges read (NudeNet, CLIP, the FID Inception)."""

from __future__ import annotations

import torch


def uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images ``[..., C, H, W]`` in [-1, 1] as uint8 pixels ``[..., 3, H, W]`` on the same device, quantised as a saved
    PNG is (grey repeated to RGB)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(*pixels.shape[:-3], 3, *pixels.shape[-2:]) if pixels.shape[-3] == 1 else pixels
