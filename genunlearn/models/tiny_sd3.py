"""SD3 pipelines built offline at toy size: SD3's component classes (two CLIP text encoders with projections, a T5
encoder with a word-level ``T5TokenizerFast``, ``AutoencoderKL``, ``SD3Transformer2DModel``,
``FlowMatchEulerDiscreteScheduler``) in a ``StableDiffusion3Pipeline``, so what runs on them runs on the real ones."""

from __future__ import annotations

from collections.abc import Iterable

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from genunlearn.models.tiny_sd import TINY_SD, word_clip_encoders


def word_t5_tokenizer(words: Iterable[str]) -> T5TokenizerFast:
    """A ``T5TokenizerFast`` in which each of ``words`` is one piece (a unigram vocabulary of "▁word" pieces after
    T5's pad, end and unknown tokens); it saves as ``tokenizer.json`` and loads with ``from_pretrained``."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("\u2581" + word, -1.0) for word in words]]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_tiny_sd3(words: Iterable[str], text_encoder: dict, text_encoder_2: dict, text_encoder_3: dict,
                   transformer: dict, vae: dict, max_length: int = 16, shift: float = 3.0,
                   seed: int = 0) -> StableDiffusion3Pipeline:
    """A freshly initialised ``StableDiffusion3Pipeline`` whose tokenizers know ``words``: two
    ``CLIPTextModelWithProjection`` (``projection_dim`` each) and a ``T5EncoderModel`` (``text_encoder_3``: a
    ``T5Config``'s arguments; its ``d_model`` is the joint attention width, at least the CLIP widths' sum, which the
    pipeline zero-pads to it), an ``SD3Transformer2DModel`` whose pooled projection takes both CLIP projections, a VAE
    with a shift factor (SD3's latents are shifted, then scaled), and SD3's flow-matching Euler scheduler with
    ``shift`` (SD3's 3.0 is its 1024² shift)."""
    words = sorted(set(words))
    tokenizer, (encoder, encoder_2) = word_clip_encoders(words, max_length, seed, (CLIPTextModelWithProjection, text_encoder),
                                                         (CLIPTextModelWithProjection, text_encoder_2))
    tokenizer_3 = word_t5_tokenizer(words)
    encoder_3 = T5EncoderModel(T5Config(**text_encoder_3, vocab_size=len(tokenizer_3), pad_token_id=0, eos_token_id=1,
                                        decoder_start_token_id=0))
    denoiser = SD3Transformer2DModel(**transformer, joint_attention_dim=encoder_3.config.d_model,
                                     pooled_projection_dim=encoder.config.projection_dim + encoder_2.config.projection_dim)
    return StableDiffusion3Pipeline(
        transformer=denoiser, vae=AutoencoderKL(**{"shift_factor": 0.0, **vae}), text_encoder=encoder.eval(),
        tokenizer=tokenizer, text_encoder_2=encoder_2.eval(), tokenizer_2=tokenizer, text_encoder_3=encoder_3.eval(),
        tokenizer_3=tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))


TINY_SD3 = {  # SD3's component classes at toy size: RGB 32x32, latents 4x4x4, 2x2 patches
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "projection_dim": 16},
    "text_encoder_2": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "projection_dim": 16},
    "text_encoder_3": {"d_model": 48, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2},
    "transformer": {"sample_size": 4, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                    "attention_head_dim": 8, "num_attention_heads": 2, "caption_projection_dim": 16,
                    "pos_embed_max_size": 4},
    "vae": TINY_SD["vae"],
}


def tiny_stable_diffusion_3(prompts: Iterable[str], *, seed: int = 0) -> StableDiffusion3Pipeline:
    """An untrained ``StableDiffusion3Pipeline`` at toy size (``TINY_SD3``: SD3's component classes, T5 included, RGB 32x32
    images, 4x4x4 latents) whose tokenizers know every word of ``prompts``, initialised from ``seed``: the flow-matching
    route of every method, end to end in seconds on a CPU."""
    words = sorted({word for prompt in prompts for word in prompt.split()})
    if not words:
        raise ValueError("tiny_stable_diffusion_3: pass the prompts it will be asked (its tokenizer knows only their words)")
    return build_tiny_sd3(words, max_length=12, seed=seed, **TINY_SD3)
