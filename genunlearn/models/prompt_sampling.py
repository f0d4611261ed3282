"""Sampling a text-to-image task per prompt, seeded by (seed, prompt id) and spread over processes: a concept
erasure's data (the model's own generations) and its evaluation."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from genunlearn.models.sampling import SAMPLE_BATCH, class_generator, spread_over_processes
from genunlearn.tasks.text_to_image import TextConditioned, TextToImageTask, conditioned_parts, sampling_scheduler

TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the pipelines' names, in their order


def denoiser_of(pipeline: DiffusionPipeline) -> nn.Module:
    """A text-to-image pipeline's denoiser: its ``unet``, or SD3's ``transformer``."""
    return pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet


def erased_model(pipeline: DiffusionPipeline, text_encoders: list[nn.Module]) -> nn.Module:
    """The model a saved erasure's ``pipeline`` holds: its denoiser, or a ``TextConditioned`` of it and the pipeline's
    text encoders when their weights differ from ``text_encoders`` (the original's: the erasure trained them)."""
    own = [getattr(pipeline, name) for name in TEXT_ENCODER_COMPONENTS[:len(text_encoders)]]
    same = all(torch.equal(a, b.to(a.device)) for mine, theirs in zip(own, text_encoders)
               for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    return denoiser_of(pipeline) if same else TextConditioned(denoiser_of(pipeline), own)


def pipeline_with_ddim(pipeline_class: type[DiffusionPipeline], components: dict, noise_schedule: dict) -> DiffusionPipeline:
    """How genunlearn samples a text-to-image model: ``pipeline_class`` (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``) of ``components`` with its ``sampling_scheduler`` on the
    ``noise_schedule`` (a scheduler's config), no safety checker and no progress bar."""
    extra = {"requires_safety_checker": False} if issubclass(pipeline_class, StableDiffusionPipeline) else {}
    pipeline = pipeline_class(**components, scheduler=sampling_scheduler(pipeline_class, noise_schedule), **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampler_like(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """``pipeline_with_ddim`` of ``pipeline``'s own class and components (a user's SD or SD-XL pipeline)."""
    components = {k: v for k, v in pipeline.components.items() if k not in ("scheduler", "safety_checker", "feature_extractor")}
    if isinstance(pipeline, StableDiffusionPipeline):
        components.update(safety_checker=None, feature_extractor=None)
    return pipeline_with_ddim(type(pipeline), components, pipeline.scheduler.config)


def sd_pipeline_for(task: TextToImageTask, unet: nn.Module | None = None) -> DiffusionPipeline:
    """``pipeline_with_ddim`` of a text-to-image task (its ``pipeline_class``): its UNet (or ``unet``) with the frozen
    text encoder(s), tokenizer(s) and VAE, on the task's noise schedule; a ``TextConditioned`` ``unet`` brings its
    own text encoder(s)."""
    denoiser, encoders = conditioned_parts(task.model if unet is None else unet, task.text_encoders)
    components = {**task.pipeline_components(denoiser), **dict(zip(TEXT_ENCODER_COMPONENTS, encoders))}
    return pipeline_with_ddim(task.pipeline_class, components, task.scheduler.config)


@torch.no_grad()
def generate_prompt(pipeline: StableDiffusionPipeline, prompt: str, prompt_id: int, count: int, *, guidance: float,
                    steps: int, seed: int, latents: bool = False) -> torch.Tensor:
    """``count`` generations ``[count, C, H, W]`` of ``prompt`` on CPU: images in [-1, 1], or with ``latents`` the
    denoiser's latents (as the task encodes images: times the VAE's scaling factor, never decoded); seeded by (seed,
    ``prompt_id``)."""
    denoiser = denoiser_of(pipeline)
    was_training = denoiser.training
    denoiser.eval()
    chunks = []
    for chunk, start in enumerate(range(0, count, SAMPLE_BATCH)):
        size = min(SAMPLE_BATCH, count - start)
        output = pipeline([prompt] * size, num_inference_steps=steps, guidance_scale=guidance,
                          generator=class_generator(seed, prompt_id, chunk), output_type="latent" if latents else "pt")
        chunks.append(output.images.float().cpu() if latents else output.images.float().cpu() * 2 - 1)
    denoiser.train(was_training)
    return torch.cat(chunks)


def sample_prompts(pipeline: StableDiffusionPipeline, prompts: list[str], ids: list[int], per_prompt: int,
                   accelerator: Accelerator, *, guidance: float, steps: int, seed: int = 0,
                   latents: bool = False) -> dict[int, torch.Tensor]:
    """``{id: per_prompt generations of prompts[id]}`` for every id in ``ids``, spread over processes and gathered on
    all; each prompt's generations depend only on (seed, id), not on the process count."""
    pipeline.to(accelerator.device)
    return spread_over_processes(ids, lambda i: generate_prompt(pipeline, prompts[i], i, per_prompt, guidance=guidance,
                                                                steps=steps, seed=seed, latents=latents),
                                 accelerator, f"sampling {per_prompt} per prompt")
