"""SD-XL as a text-to-image task (``StableDiffusionXLPipeline``'s components; the refiner is not needed): two text
encoders whose penultimate hidden states, side by side, condition the UNet's cross-attention, the second's pooled
projection and six micro-conditioning time ids its added embedding, and ∅ all zeros (SD-XL base's
``force_zeros_for_empty_prompt``: the pipeline's unconditional half). Every method's loss is the base task's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from genunlearn.tasks.text_to_image import TextToImageTask, tokenize


def penultimate_and_pooled(text_encoders: Sequence[nn.Module], tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, L, D1 + D2 ...], pooled)`` of prompts given as ``tokens`` (one ``[B, L]`` per encoder), as SD-XL's
    and SD3's pipelines encode with CLIP (no clip skip): each encoder's penultimate hidden states, concatenated; the
    pooled projections of the encoders that return one (``CLIPTextModelWithProjection``), concatenated."""
    hidden, pooled = [], []
    for encoder, ids in zip(text_encoders, tokens):
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        if output[0].ndim == 2:
            pooled.append(output[0])
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_prompts_xl(text_encoders: Sequence[nn.Module], tokenizers: Sequence[CLIPTokenizer],
                      prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [P, L, D1 + D2], pooled [P, D'])`` of ``prompts`` as ``StableDiffusionXLPipeline.encode_prompt`` computes
    them (``penultimate_and_pooled``; SD-XL's first encoder returns no projection)."""
    hidden, pooled = penultimate_and_pooled(text_encoders, [tokenize(t, prompts) for t in tokenizers])
    return hidden.float().cpu(), pooled.float().cpu()


class TextToImageXLTask(TextToImageTask):
    """A ``TextToImageTask`` over SD-XL's components; ``image_size``: the side of the images the time ids name (default:
    the UNet's sample size times the VAE's downscaling, the pipeline's default resolution)."""

    pipeline_class = StableDiffusionXLPipeline

    def __init__(self, preset, unet: nn.Module, vae: nn.Module, text_encoders: Sequence[nn.Module],
                 tokenizers: Sequence[CLIPTokenizer], scheduler, train_data, test_data, *,
                 force_zeros_for_empty_prompt: bool = True, image_size: int | None = None, **kwargs) -> None:
        self.text_encoder_2: CLIPTextModelWithProjection = text_encoders[1].eval().requires_grad_(False)
        self.tokenizer_2 = tokenizers[1]
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        super().__init__(preset, unet, vae, text_encoders[0], tokenizers[0], scheduler, train_data, test_data, **kwargs)
        size = image_size or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        self.time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)  # original, crop corner, target

    @classmethod
    def from_pipeline(cls, pipeline: StableDiffusionXLPipeline, preset, scheduler, train_data, test_data,
                      **kwargs) -> "TextToImageXLTask":
        """The task over ``pipeline``'s components (its ∅ convention included)."""
        return cls(preset, pipeline.unet, pipeline.vae, (pipeline.text_encoder, pipeline.text_encoder_2),
                   (pipeline.tokenizer, pipeline.tokenizer_2), scheduler, train_data, test_data,
                   force_zeros_for_empty_prompt=pipeline.config.force_zeros_for_empty_prompt, **kwargs)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer, self.tokenizer_2]

    def encode_tokens(self, encoders: Sequence[nn.Module], tokens: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """SD-XL's conditioning: both encoders' penultimate hidden states ``[B, L, D1 + D2]`` and the second's pooled
        projection ``[B, D']`` (``penultimate_and_pooled``)."""
        hidden, pooled = penultimate_and_pooled(encoders, tokens)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def null_conditions(self, conditions: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """∅ all zeros when ``force_zeros_for_empty_prompt`` (SD-XL base's unconditional half)."""
        if not self.force_zeros_for_empty_prompt:
            return conditions
        null = labels == self.null_prompt
        return {name: torch.where(null.view(-1, *[1] * (value.ndim - 1)), torch.zeros_like(value), value)
                for name, value in conditions.items()}

    def model_inputs(self, conditions: dict[str, torch.Tensor], device: torch.device) -> dict:
        """The hidden states for cross-attention; the pooled projection and the six time ids for the added embedding."""
        count = len(conditions["text_embeds"])
        return {"encoder_hidden_states": conditions["encoder_hidden_states"].to(device),
                "added_cond_kwargs": {"text_embeds": conditions["text_embeds"].to(device),
                                      "time_ids": self.time_ids.to(device).expand(count, 6)}}

    def pipeline_components(self, unet: nn.Module) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "unet": unet,
                "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
