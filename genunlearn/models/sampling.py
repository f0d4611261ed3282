"""Sampling class-conditional pipelines: the sampling pipeline genunlearn builds, and per-class samples seeded by
(seed, class), spread over processes. Used by evaluation and by data-free training data alike."""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import DDIMScheduler, DiTPipeline

from genunlearn.models.class_conditional import ClassConditionalPipeline, eval_mode
from genunlearn.models.pipeline import Pipeline, make_pipeline, pipeline_denoiser, pipeline_num_classes
from genunlearn.progress import progress
from genunlearn.tasks.diffusion import Denoiser, DiffusionTask


def pipeline_for(source: DiffusionTask | Pipeline, denoiser: Denoiser | None = None) -> Pipeline:
    """How genunlearn samples: ``source``'s denoiser (a task's model or a pipeline's; or ``denoiser``) with its VAE
    and classes, and a DDIM scheduler on ``source``'s own noise schedule."""
    if isinstance(source, DiffusionTask):
        parts = source.model, source.scheduler, source.vae, source.num_classes, source.id2label
    else:
        parts = pipeline_denoiser(source), source.scheduler, source.vae, pipeline_num_classes(source), source.config.get("id2label")
    own, scheduler, vae, num_classes, id2label = parts
    return make_pipeline(own if denoiser is None else denoiser, DDIMScheduler.from_config(scheduler.config), vae,
                         num_classes, id2label=id2label)


@torch.no_grad()
def sample_images(pipeline: Pipeline, labels: list[int], *, guidance: float, steps: int, generator: torch.Generator,
                  latents: bool = False) -> torch.Tensor:
    """One sample per label ``[N, C, H, W]`` on CPU: images in [-1, 1], or with ``latents`` the denoiser's own
    output space (VAE latents times the scaling factor, never decoded), in eval mode for either pipeline kind."""
    if latents:
        pipeline = ClassConditionalPipeline(denoiser=pipeline_denoiser(pipeline), scheduler=pipeline.scheduler,
                                            num_classes=pipeline_num_classes(pipeline))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(labels, guidance, steps, generator, output_type="latent").images.cpu()
    if isinstance(pipeline, DiTPipeline):
        with eval_mode(pipeline.transformer, pipeline.vae):
            images = pipeline(labels, guidance, generator, steps, output_type="pt").images
    else:
        images = pipeline(labels, guidance, steps, generator, output_type="pt").images
    return (images.float() * 2 - 1).cpu()  # both return [0, 1], as diffusers' pipelines do


SAMPLE_BATCH = 256


def class_generator(seed: int, class_id: int, chunk: int) -> torch.Generator:
    """The generator for one chunk of one class's samples: the same whatever the process count."""
    return torch.Generator().manual_seed(seed * 1_000_003 + class_id * 7_919 + chunk)


@torch.no_grad()
def generate_class(pipeline: Pipeline, class_id: int, count: int, *, guidance: float, steps: int, seed: int,
                   latents: bool = False) -> torch.Tensor:
    """``count`` samples ``[count, C, H, W]`` of ``class_id`` (images in [-1, 1], or latents), seeded by (seed, class)."""
    chunks = []
    for chunk, start in enumerate(range(0, count, SAMPLE_BATCH)):
        size = min(SAMPLE_BATCH, count - start)
        chunks.append(sample_images(pipeline, [class_id] * size, guidance=guidance, steps=steps,
                                    generator=class_generator(seed, class_id, chunk), latents=latents))
    return torch.cat(chunks)


def spread_over_processes(ids: list[int], generate: Callable[[int], torch.Tensor], accelerator: Accelerator,
                          desc: str) -> dict[int, torch.Tensor]:
    """``{id: generate(id)}`` for every id, the ids spread over processes and the results gathered on all."""
    own = ids[accelerator.process_index :: accelerator.num_processes]
    bar = progress(own, desc=desc, unit="class", show=accelerator.is_main_process, leave=False)
    mine = {i: generate(i) for i in bar}
    gathered = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    return {i: samples for part in gathered for i, samples in part.items()}


def sample_classes(
    pipeline: Pipeline,
    classes: list[int],
    per_class: int,
    accelerator: Accelerator,
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
    latents: bool = False,
) -> dict[int, torch.Tensor]:
    """``per_class`` samples of each class (CPU; images in [-1, 1], or latents), classes spread over processes
    and gathered on all. Each class's samples depend only on (seed, class), not on the process count."""
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    return spread_over_processes(classes, lambda c: generate_class(pipeline, c, per_class, guidance=guidance, steps=steps,
                                                                   seed=seed, latents=latents),
                                 accelerator, f"sampling {per_class} per class")
