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


@torch.no_grad()
def encode_prompts_xl(text_encoders: Sequence[nn.Module], tokenizers: Sequence[CLIPTokenizer],
                      prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [P, L, D1 + D2], pooled [P, D'])`` of ``prompts`` as ``StableDiffusionXLPipeline.encode_prompt`` computes
    them (no clip skip): each encoder's penultimate hidden states, concatenated; the pooled projection of the first
    encoder that returns one (the second, a ``CLIPTextModelWithProjection``)."""
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        output = encoder(tokenize(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1).float().cpu(), pooled.float().cpu()


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

    def encode_prompt_table(self, prompts: list[str]) -> torch.Tensor:
        hidden, pooled = encode_prompts_xl((self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2), prompts)
        if self.force_zeros_for_empty_prompt:
            hidden[self.null_prompt], pooled[self.null_prompt] = 0.0, 0.0
        self.pooled_embeddings = pooled  # [P, D']
        return hidden

    def unet_inputs(self, labels: torch.Tensor, device: torch.device) -> dict:
        pooled = self.pooled_embeddings[labels.cpu()].to(device)
        return {"encoder_hidden_states": self.condition(labels, device),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids.to(device).expand(len(labels), 6)}}

    def pipeline_components(self, unet: nn.Module) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "unet": unet,
                "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}



def text_to_image_task(pipeline, preset, scheduler, train_data, test_data, **options) -> TextToImageTask:
    """The task over a ``StableDiffusionPipeline``'s or ``StableDiffusionXLPipeline``'s components (``options``: the
    ``TextToImageTask`` keywords)."""
    if isinstance(pipeline, StableDiffusionXLPipeline):
        return TextToImageXLTask.from_pipeline(pipeline, preset, scheduler, train_data, test_data, **options)
    return TextToImageTask(preset, pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, scheduler,
                           train_data, test_data, **options)
