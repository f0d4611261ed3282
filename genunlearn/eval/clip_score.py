"""CLIP score from a local CLIP folder: how well generations match their prompts (the COCO protocol's second figure)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from genunlearn.errors import UserError
from genunlearn.eval.pixels import uint8_rgb


def check_clip_folder(folder: str | Path) -> None:
    """A UserError naming ``folder`` unless it holds a saved CLIP model (``config.json``)."""
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"--clip-model {folder}: no CLIP model there (no config.json); where there is a network, save "
                        "openai/clip-vit-large-patch14 with CLIPModel and CLIPProcessor .save_pretrained and pass the folder")


def load_clip(folder: str | Path) -> tuple[nn.Module, object]:
    """``(CLIPModel, CLIPProcessor)`` saved in ``folder``; a UserError naming the folder when they are not there."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    check_clip_folder(folder)
    return CLIPModel.from_pretrained(folder, local_files_only=True).eval(), CLIPProcessor.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def clip_score(model: nn.Module, processor, image: torch.Tensor, prompt: str) -> float:
    """CLIP score ``100 * max(cos(image, prompt), 0)`` of one image ``[C, H, W]`` in [-1, 1] seen as uint8 pixels, as
    torchmetrics' ``CLIPScore`` defines it (computed here: torchmetrics 1.9 takes ``get_image_features`` for a tensor,
    and transformers 5 returns it inside a model output)."""
    device = next(model.parameters()).device
    images = processor(images=[uint8_rgb(image).cpu()], return_tensors="pt")
    text = processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
    image_embedding = _embedding(model.get_image_features(pixel_values=images["pixel_values"].to(device)))
    text_embedding = _embedding(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                       attention_mask=text["attention_mask"].to(device)))
    return float(100 * torch.nn.functional.cosine_similarity(image_embedding, text_embedding).clamp(min=0))


def _embedding(output) -> torch.Tensor:
    """A projected CLIP embedding: the tensor itself (transformers 4) or the output's ``pooler_output`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
