"""Data-free forgetting: a diffusion model's own class-conditional samples as its training and test sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.engine.fingerprint import model_fingerprint
from genunlearn.models.pipeline import Pipeline, pipeline_denoiser
from genunlearn.models.sampling import sample_classes
from genunlearn.storage.files import atomic_save_tensors, read_cached_tensors

TRAIN_SEED_OFFSET = 20_011  # generated data never reuses the evaluation's seeds
TEST_SEED_OFFSET = 10_007


def _generate(pipeline, classes, per_class, accelerator, guidance, steps, seed, latents) -> tuple[torch.Tensor, torch.Tensor]:
    samples = sample_classes(pipeline, classes, per_class, accelerator, guidance=guidance, steps=steps, seed=seed, latents=latents)
    images = torch.cat([samples[c] for c in classes])
    labels = torch.cat([torch.full((len(samples[c]),), c, dtype=torch.long) for c in classes])
    return images, labels


def generated_datasets(
    pipeline: Pipeline,
    class_names: list[str],
    classes: list[int],
    per_class: int,
    accelerator: Accelerator,
    *,
    guidance: float,
    steps: int,
    seed: int,
    cache_dir: Path | None,
    latents: bool = False,
) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """``(train, test)``: ``per_class`` samples of each of ``classes`` (ids into ``class_names``), and a quarter as
    many with other seeds: images in [-1, 1], or with ``latents`` the denoiser's latents (a latent model's data,
    never decoded). Generated once and cached by (weights, classes, counts, sampler, seed, output space)."""
    test_per_class = max(2, per_class // 4)
    train_seed = seed + TRAIN_SEED_OFFSET
    vae = None if latents or pipeline.vae is None else model_fingerprint(pipeline.vae)
    key = json.dumps([model_fingerprint(pipeline_denoiser(pipeline)), vae, latents, classes, per_class, test_per_class,
                      guidance, steps, train_seed])
    path = None if cache_dir is None else Path(cache_dir) / "generated" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    stored = read_cached_tensors(path, accelerator)
    if stored is not None:
        parts = [stored["train_images"], stored["train_labels"], stored["test_images"], stored["test_labels"]]
    else:
        parts = [*_generate(pipeline, classes, per_class, accelerator, guidance, steps, train_seed, latents),
                 *_generate(pipeline, classes, test_per_class, accelerator, guidance, steps, train_seed + TEST_SEED_OFFSET, latents)]
        if path is not None and accelerator.is_main_process:
            names = ("train_images", "train_labels", "test_images", "test_labels")
            atomic_save_tensors(dict(zip(names, parts)), path)
    return LabeledTensorDataset(parts[0], parts[1], class_names), LabeledTensorDataset(parts[2], parts[3], class_names)
