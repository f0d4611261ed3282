"""SD3 as a text-to-image task (``StableDiffusion3Pipeline``'s components): an MMDiT (``SD3Transformer2DModel``) trained
by flow matching on ``FlowMatchEulerDiscreteScheduler``'s schedule. x_t = (1 - σ) x₀ + σ ε and the transformer
predicts the velocity v = ε - x₀; t = σ · T. The prompt conditioning is the pipeline's: both CLIP encoders'
penultimate hidden states side by side, zero-padded to the joint attention width, followed by T5's tokens (zeros
without a third encoder), and their pooled projections side by side; ∅ is the empty prompt encoded.

Every method's objective re-derived for this parameterisation (docs/fidelity.md, "Flow matching"): ``loss`` (L_DSM)
is the flow-matching loss ‖v_θ(x_t, c) - (ε - x₀)‖², t drawn logit-normal(0, 1) as diffusers' SD3 training scripts
draw it (``weighting_scheme: logit_normal``, weight 1); rl and SalUn's guided objective keep their forms with v for ε;
ESD's target ``v*(∅) - η (v*(c) - v*(∅))`` is the ε target mapped exactly, since at a fixed x_t the velocity is affine
in the ε prediction (v = (ε - x_t) / (1 - σ)) and the guidance weights sum to one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torch import nn

from genunlearn.noise import current_noise, gaussian_sample
from genunlearn.tasks.base import ParameterScope
from genunlearn.tasks.text_to_image import MASK_GUIDANCE, TextToImageTask, scope_parameters, tokenize
from genunlearn.tasks.text_to_image_xl import penultimate_and_pooled

MMDIT_SCOPE_NAMES = {  # scope_parameters' name patterns for an MMDiT (no separate cross-attention: text meets image in
    "cross_attention": (".attn.",),  # every joint attention layer, both streams' projections; SD3.5's attn2 is image-only)
    "noxattn_excluded": ("time_text_embed.", "norm_out.", "proj_out."),  # the time embedding and the output layers
}


def logit_normal_indices(count: int, steps: int, device: torch.device) -> torch.Tensor:
    """``count`` training-schedule indices ``[count]`` with u = sigmoid(N(0, 1)) (drawn from ``current_noise``) and index
    ⌊u · T⌋: diffusers' SD3 scripts' ``compute_density_for_timestep_sampling("logit_normal", 0, 1)``."""
    u = torch.sigmoid(current_noise().randn((count,)))
    return (u * steps).long().clamp(max=steps - 1).to(device)


class FlowMatchTextToImageTask(TextToImageTask):
    """A ``TextToImageTask`` over SD3's components: ``model`` an ``SD3Transformer2DModel``, ``text_encoders`` the two
    ``CLIPTextModelWithProjection`` and T5 (or None), ``scheduler`` a ``FlowMatchEulerDiscreteScheduler`` (never set to
    fewer steps: its training grid gives t and σ). ``max_sequence_length``: T5's tokens (the pipeline's default 256)."""

    pipeline_class = StableDiffusion3Pipeline
    importance_loss_id = f"sd3_guided_velocity_w{MASK_GUIDANCE}_logit_normal_mean"

    def __init__(self, preset, transformer: nn.Module, vae: nn.Module, text_encoders: Sequence[nn.Module | None],
                 tokenizers: Sequence, scheduler: FlowMatchEulerDiscreteScheduler, train_data, test_data, *,
                 max_sequence_length: int = 256, **kwargs) -> None:
        self.text_encoder_2 = text_encoders[1].eval().requires_grad_(False)
        self.text_encoder_3 = None if text_encoders[2] is None else text_encoders[2].eval().requires_grad_(False)
        self.tokenizer_2, self.tokenizer_3 = tokenizers[1], tokenizers[2]
        self.max_sequence_length = max_sequence_length
        self.joint_attention_dim = transformer.config.joint_attention_dim
        super().__init__(preset, transformer, vae, text_encoders[0], tokenizers[0], scheduler, train_data, test_data, **kwargs)

    @classmethod
    def from_pipeline(cls, pipeline: StableDiffusion3Pipeline, preset, train_data, test_data,
                      **kwargs) -> "FlowMatchTextToImageTask":
        """The task over ``pipeline``'s components, its scheduler's schedule included."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        return cls(preset, pipeline.transformer, pipeline.vae,
                   (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3),
                   (pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3), scheduler, train_data, test_data, **kwargs)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2, *([self.tokenizer_3] if self.text_encoder_3 is not None else [])]

    def prompt_tokens(self, prompts: list[str]) -> list[torch.Tensor]:
        """CLIP's ids padded to each tokenizer's length; T5's to ``max_sequence_length`` (the pipeline's padding)."""
        tokens = [tokenize(self.tokenizer, prompts), tokenize(self.tokenizer_2, prompts)]
        if self.text_encoder_3 is not None:
            tokens.append(self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                           truncation=True, add_special_tokens=True, return_tensors="pt").input_ids)
        return tokens

    def encode_tokens(self, encoders: Sequence[nn.Module], tokens: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """SD3's conditioning (``StableDiffusion3Pipeline.encode_prompt``, no clip skip): ``encoder_hidden_states``
        ``[B, L + L_T5, D_joint]``, ``pooled_projections`` ``[B, D1' + D2']``."""
        hidden, pooled = penultimate_and_pooled(encoders[:2], tokens[:2])
        if len(encoders) > 2:
            t5 = encoders[2](tokens[2].to(encoders[2].device))[0]
        else:
            t5 = hidden.new_zeros((len(hidden), self.max_sequence_length, self.joint_attention_dim))
        hidden = F.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
        return {"encoder_hidden_states": torch.cat([hidden, t5], dim=-2), "pooled_projections": pooled}

    def model_inputs(self, conditions: dict[str, torch.Tensor], device: torch.device) -> dict:
        return {name: conditions[name].to(device) for name in ("encoder_hidden_states", "pooled_projections")}

    def denoise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The velocity v_θ(x_t, t, c) ``[B, C, h, w]``."""
        return model(hidden_states=noisy, timestep=timesteps, **inputs).sample

    def pipeline_components(self, unet: nn.Module) -> dict:
        return {"transformer": unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
                "text_encoder_3": self.text_encoder_3, "tokenizer_3": self.tokenizer_3}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (VAE latents - shift factor) times the scaling factor, as SD3's pipeline decodes them."""
        if self.encoded_data:
            return images
        with torch.no_grad():
            latents = gaussian_sample(self.vae.encode(images.to(self.vae.dtype)).latent_dist)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            return self.vae.decode(latents).sample.float().clamp(-1.0, 1.0)

    def timestep_of_index(self, index: int) -> torch.Tensor:
        """t = σ T of the training grid's ``index``-th least noisy point (index 0 clean, T - 1 pure noise)."""
        return self.scheduler.timesteps[len(self.scheduler.timesteps) - 1 - index]

    def noised(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, v, t)`` for clean ``images``: ε, then logit-normal indices into the training grid (both from
        ``current_noise``), x_t = (1 - σ) x₀ + σ ε, the velocity target v = ε - x₀."""
        clean = self.encode(images)
        # deviation: diffusers' SD3 scripts default to precondition_outputs=1 (an x̂₀ target, i.e. σ²-weighted); the
        # unweighted velocity keeps every objective in one space (docs/fidelity.md; pinned in tests/test_sd3.py)
        noise = current_noise().randn(tuple(clean.shape), clean.device, clean.dtype)
        index = logit_normal_indices(len(clean), self.scheduler.config.num_train_timesteps, torch.device("cpu"))
        timesteps = self.scheduler.timesteps[index].to(clean.device)
        sigmas = self.scheduler.sigmas[index].to(clean.device, clean.dtype).view(-1, *[1] * (clean.ndim - 1))
        return (1 - sigmas) * clean + sigmas * noise, noise - clean, timesteps

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        """``scope_parameters`` with MMDiT's names: ``cross-attention`` is every joint attention layer."""
        return scope_parameters(model, scope, **MMDIT_SCOPE_NAMES)
