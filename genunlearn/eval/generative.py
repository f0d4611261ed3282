"""Metrics of generated samples: how a classifier trained on real data labels each class's samples. Never trains."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from genunlearn.eval.mia import softmax_entropy
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
    mine = {c: generate_class(pipeline, c, per_class, guidance=guidance, steps=steps, seed=seed, latents=latents)
            for c in classes[accelerator.process_index :: accelerator.num_processes]}
    gathered = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    return {c: images for part in gathered for c, images in part.items()}


@torch.no_grad()
def class_metrics(classifier: nn.Module, samples: dict[int, torch.Tensor], device: torch.device) -> dict[int, dict[str, float]]:
    """For each class c's samples: the fraction the classifier labels c (``accuracy``), mean softmax entropy
    (nats) and mean probability of c."""
    classifier = classifier.to(device).eval()
    metrics = {}
    for class_id, images in samples.items():
        logits = classifier(images.to(device)).float().cpu()
        metrics[class_id] = {
            "accuracy": float((logits.argmax(1) == class_id).double().mean()),
            "entropy": float(softmax_entropy(logits).mean()),
            "probability": float(torch.softmax(logits.double(), 1)[:, class_id].mean()),
        }
    return metrics


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
