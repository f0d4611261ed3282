"""Stable Diffusion and SD-XL pipelines built offline at toy size (ALGORITHMS_T2I.md §5): their own component classes
(CLIP tokenizers and text encoders, ``AutoencoderKL``, ``UNet2DConditionModel``) in a ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``, so what runs on them runs on the real ones."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def word_pieces(word: str) -> list[str]:
    """``word``'s characters as CLIP's BPE starts from them: the last one marked as a word end (``</w>``)."""
    return [*word[:-1], word[-1] + "</w>"]


def write_word_tokenizer(words: Iterable[str], folder: Path, max_length: int) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer (``vocab.json``, ``merges.txt``) in which each of ``words`` is one token, and load it
    with ``max_length`` tokens per prompt. The vocabulary holds every character alone and as a word end, every
    substring of every word, and the two special tokens; the merges join every two adjacent substrings of a word, so
    whichever merge fires first, a word always ends as one token (a single left-to-right chain per word breaks when
    another word's merge wins: "nine" stuck at "n" "in" "e")."""
    words = sorted(set(words))
    vocabulary = {piece: None for word in words for piece in word_pieces(word)}
    vocabulary.update({c: None for word in words for c in word})
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        pieces = word_pieces(word)
        for start in range(len(pieces)):
            for end in range(start + 2, len(pieces) + 1):
                vocabulary["".join(pieces[start:end])] = None
                for cut in range(start + 1, end):
                    merges["".join(pieces[start:cut]), "".join(pieces[cut:end])] = None
    tokens = [*vocabulary, BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    ordered = sorted(merges, key=lambda pair: len(pair[0]) + len(pair[1]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ordered))
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def word_clip_encoders(words: Iterable[str], max_length: int, seed: int,
                       *encoders: tuple[type, dict]) -> tuple[CLIPTokenizer, list]:
    """A word-level CLIP tokenizer of ``words`` (``write_word_tokenizer``, ``max_length`` tokens per prompt) and one text
    encoder per ``(class, CLIPTextConfig arguments)``, in order, drawn after ``torch.manual_seed(seed)``; each takes its
    vocabulary, positions and special ids from the tokenizer."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_word_tokenizer(words, Path(folder), max_length)
    special = dict(vocab_size=len(tokenizer), max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, [cls(CLIPTextConfig(**config, **special)) for cls, config in encoders]


def build_tiny_sd(words: Iterable[str], text_encoder: dict, unet: dict, vae: dict, max_length: int = 16,
                  beta_schedule: str = "squaredcos_cap_v2", seed: int = 0) -> StableDiffusionPipeline:
    """A freshly initialised ``StableDiffusionPipeline`` whose tokenizer knows ``words`` (each one token). ``text_encoder``,
    ``unet`` and ``vae``: the components' config arguments (``CLIPTextConfig``, ``UNet2DConditionModel``,
    ``AutoencoderKL``); the text encoder's vocabulary, positions and special ids are set here. The scheduler is SD v1's
    DDIM (latents unclipped); no safety checker."""
    tokenizer, (encoder,) = word_clip_encoders(words, max_length, seed, (CLIPTextModel, text_encoder))
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae), text_encoder=encoder.eval(), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet, cross_attention_dim=encoder.config.hidden_size),
        scheduler=DDIMScheduler(beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


TINY_SD = {  # Stable Diffusion v1's component classes and block types at toy size: RGB 32x32, latents 4x4x4
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    "unet": {"sample_size": 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "block_out_channels": [8, 8, 16], "attention_head_dim": 4},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [4, 4, 8, 8], "layers_per_block": 1, "scaling_factor": 0.18215},
}


def tiny_stable_diffusion(prompts: Iterable[str], *, seed: int = 0) -> StableDiffusionPipeline:
    """An untrained ``StableDiffusionPipeline`` at toy size (``TINY_SD``: Stable Diffusion v1's component classes and
    block types, RGB 32x32 images, 4x4x4 latents, a 12-token CLIP text encoder) whose tokenizer knows every word of
    ``prompts``, initialised from ``seed``; built in a second, offline. Its images are noise: it runs every concept
    erasure step in seconds on a CPU, to try the library's route end to end before a real pipeline (``sd-digits`` is
    the tiny model that is trained)."""
    words = sorted({word for prompt in prompts for word in prompt.split()})
    if not words:
        raise ValueError("tiny_stable_diffusion: pass the prompts it will be asked (its tokenizer knows only their words)")
    return build_tiny_sd(words, max_length=12, seed=seed, **TINY_SD)


def build_tiny_sdxl(words: Iterable[str], text_encoder: dict, text_encoder_2: dict, unet: dict, vae: dict,
                    max_length: int = 16, seed: int = 0) -> StableDiffusionXLPipeline:
    """A freshly initialised ``StableDiffusionXLPipeline`` whose two tokenizers know ``words``: a ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection`` (``text_encoder_2``: with ``projection_dim``), a ``UNet2DConditionModel`` whose
    cross-attention takes both encoders' hidden states side by side and whose added embedding takes the second's
    pooled projection and the six micro-conditioning time ids (``addition_time_embed_dim`` each), SD-XL's Euler
    scheduler config; ∅ is zeros (``force_zeros_for_empty_prompt``), as SD-XL base."""
    tokenizer, (encoder, encoder_2) = word_clip_encoders(words, max_length, seed, (CLIPTextModel, text_encoder),
                                                         (CLIPTextModelWithProjection, text_encoder_2))
    time_dim = unet.get("addition_time_embed_dim", 8)
    denoiser = UNet2DConditionModel(
        **{**unet, "addition_time_embed_dim": time_dim}, addition_embed_type="text_time",
        cross_attention_dim=encoder.config.hidden_size + encoder_2.config.hidden_size,
        projection_class_embeddings_input_dim=encoder_2.config.projection_dim + 6 * time_dim)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae), text_encoder=encoder.eval(), text_encoder_2=encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=denoiser, force_zeros_for_empty_prompt=True,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )


TINY_SDXL = {  # SD-XL base's component classes and block types at toy size: RGB 32x32, latents 4x4x4
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    "text_encoder_2": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "projection_dim": 16},
    "unet": {"sample_size": 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [8, 8, 16], "attention_head_dim": [2, 4, 4], "transformer_layers_per_block": [1, 1, 2],
             "use_linear_projection": True, "addition_time_embed_dim": 8},
    "vae": TINY_SD["vae"],
}


def tiny_stable_diffusion_xl(prompts: Iterable[str], *, seed: int = 0) -> StableDiffusionXLPipeline:
    """An untrained ``StableDiffusionXLPipeline`` at toy size (``TINY_SDXL``: SD-XL base's component classes and block
    types, two text encoders, RGB 32x32 images, 4x4x4 latents) whose tokenizers know every word of ``prompts``,
    initialised from ``seed``: the SD-XL route of every method, end to end in seconds on a CPU."""
    words = sorted({word for prompt in prompts for word in prompt.split()})
    if not words:
        raise ValueError("tiny_stable_diffusion_xl: pass the prompts it will be asked (its tokenizer knows only their words)")
    return build_tiny_sdxl(words, max_length=12, seed=seed, **TINY_SDXL)
