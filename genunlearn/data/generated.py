"""Data-free forgetting: a diffusion model's own samples (per class, or per prompt) as its training and test sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.engine.fingerprint import model_fingerprint, text_encoder_fingerprints
from genunlearn.models.pipeline import Pipeline, pipeline_denoiser
from genunlearn.models.prompt_sampling import denoiser_of, sample_prompts
from genunlearn.precision import numerics
from genunlearn.models.sampling import sample_classes
from genunlearn.storage.files import atomic_save_tensors, read_cached_tensors

TRAIN_SEED_OFFSET = 20_011  # generated data never reuses the evaluation's seeds
TEST_SEED_OFFSET = 10_007


def _generate(pipeline, classes, per_class, accelerator, guidance, steps, seed, latents) -> tuple[torch.Tensor, torch.Tensor]:
    samples = sample_classes(pipeline, classes, per_class, accelerator, guidance=guidance, steps=steps, seed=seed, latents=latents)
    return stacked(samples, classes)


def stacked(samples: dict[int, torch.Tensor], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, ...], labels [N])`` of per-id samples, in the order of ``ids``."""
    images = torch.cat([samples[i] for i in ids])
    labels = torch.cat([torch.full((len(samples[i]),), i, dtype=torch.long) for i in ids])
    return images, labels


Generate = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (count per id, seed) -> (images, labels)


def cached_generations(key: list, generate: Generate, per_class: int, seed: int, class_names: list[str],
                       cache_dir: Path | None, accelerator: Accelerator) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """``(train, test)``: ``generate(per_class, seed')`` and a quarter as many with other seeds (seeds the evaluation
    never uses), generated once and cached under ``cache_dir/generated`` by ``key`` (what the samples depend on)."""
    test_per_class = max(2, per_class // 4)
    train_seed = seed + TRAIN_SEED_OFFSET
    digest = hashlib.sha256(json.dumps([*key, per_class, test_per_class, train_seed]).encode()).hexdigest()[:24]
    path = None if cache_dir is None else Path(cache_dir) / "generated" / f"{digest}.safetensors"
    stored = read_cached_tensors(path, accelerator)
    if stored is not None:
        parts = [stored["train_images"], stored["train_labels"], stored["test_images"], stored["test_labels"]]
    else:
        parts = [*generate(per_class, train_seed), *generate(test_per_class, train_seed + TEST_SEED_OFFSET)]
        if path is not None and accelerator.is_main_process:
            names = ("train_images", "train_labels", "test_images", "test_labels")
            atomic_save_tensors(dict(zip(names, parts)), path)
    return LabeledTensorDataset(parts[0], parts[1], class_names), LabeledTensorDataset(parts[2], parts[3], class_names)


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
    never decoded). Generated once and cached by (weights, classes, counts, sampler, seed, output space, numerics)."""
    vae = None if latents or pipeline.vae is None else model_fingerprint(pipeline.vae)
    key = [model_fingerprint(pipeline_denoiser(pipeline)), vae, latents, classes, guidance, steps, numerics(accelerator)]
    return cached_generations(
        key, lambda count, at: _generate(pipeline, classes, count, accelerator, guidance, steps, at, latents),
        per_class, seed, class_names, cache_dir, accelerator)


def generated_prompt_datasets(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    ids: list[int],
    per_prompt: int,
    accelerator: Accelerator,
    *,
    guidance: float,
    steps: int,
    seed: int,
    cache_dir: Path | None,
) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """``(train, test)`` of a text-to-image model's own generations: ``per_prompt`` latents of each of ``ids`` (ids into
    ``prompts``, the datasets' classes), and a quarter as many with other seeds; cached by (UNet, text encoder,
    prompts and their ids, which seed them, counts, sampler, seed, numerics); SD-XL's second text encoder too."""
    key = [model_fingerprint(denoiser_of(pipeline)), *text_encoder_fingerprints(pipeline), {i: prompts[i] for i in ids}, guidance, steps, numerics(accelerator)]

    def generate(count: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked(sample_prompts(pipeline, prompts, ids, count, accelerator, guidance=guidance, steps=steps, seed=at,
                                      latents=True), ids)

    return cached_generations(key, generate, per_prompt, seed, prompts, cache_dir, accelerator)
