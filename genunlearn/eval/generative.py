"""Sampling class-conditional generators for evaluation: per-class samples seeded by (seed, class), spread over
processes; ``classify_generated`` judges them with ``eval.classify.class_metrics``. Never trains."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from genunlearn.eval.classify import class_metrics
from genunlearn.models.pipeline import Pipeline, sample_images

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
    own = classes[accelerator.process_index :: accelerator.num_processes]
    bar = tqdm(own, desc=f"sampling {per_class} per class", unit="class", disable=not accelerator.is_main_process, leave=False)
    mine = {c: generate_class(pipeline, c, per_class, guidance=guidance, steps=steps, seed=seed, latents=latents) for c in bar}
    gathered = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    return {c: images for part in gathered for c, images in part.items()}


def classify_generated(
    pipeline: Pipeline,
    classifier: nn.Module,
    classes: list[int],
    per_class: int,
    accelerator: Accelerator,
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """``class_metrics`` of freshly sampled classes."""
    samples = sample_classes(pipeline, classes, per_class, accelerator, guidance=guidance, steps=steps, seed=seed)
    return class_metrics(classifier, samples, accelerator.device)
