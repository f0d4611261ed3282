"""Diffusion pipelines and tasks: a pipeline folder or hub id given, the preset's hub id, or pretrained locally (cached)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from diffusers import DDPMScheduler

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError
from genunlearn.precision import numerics_tag
from genunlearn.storage.cache import PRETRAIN_SEED, cached_or_built, pretrained_entry
from genunlearn.models.pipeline import (
    ClassConditionalPipeline,
    Pipeline,
    pipeline_denoiser,
    pipeline_num_classes,
)
from genunlearn.models.presets import DiffusionPreset
from genunlearn.models.sampling import pipeline_for
from genunlearn.storage.pipeline_folder import load_pipeline, save_pipeline
from genunlearn.tasks.diffusion import DiffusionTask, build_denoiser, build_noise_scheduler
from genunlearn.engine.training import TrainConfig, train_from_scratch

def load_diffusion_pipeline(
    preset: DiffusionPreset,
    *,
    pretrained: str | None,
    data: tuple[LabeledDataset, LabeledDataset, str] | None,
    cache_root: Path,
    accelerator: Accelerator,
) -> Pipeline:
    """The pipeline to unlearn: ``pretrained`` (folder or hub id), else the preset's hub id, else the preset
    pretrained locally on ``data`` (``(train, test, data_id)``; cached, trained on first use)."""
    if pretrained is not None:
        return load_pipeline(pretrained)
    if preset.hub_id is not None:
        return load_pipeline(preset.hub_id)
    if data is None:
        raise UserError(f"{preset.name} has no weights to start from without data; pass --pretrained PIPELINE_DIR or --data DIR")
    return _cached_or_pretrained(preset, *data, cache_root, accelerator)


def task_from_pipeline(
    preset: DiffusionPreset,
    pipeline: Pipeline,
    train: LabeledDataset,
    test: LabeledDataset,
    *,
    cache_root: Path,
    encoded_data: bool = False,
) -> DiffusionTask:
    """The diffusion task over ``pipeline``'s denoiser (eval mode), noise schedule and VAE; ``encoded_data``: the datasets already
    hold diffusion-space tensors (a latent model's own latents), so the VAE does not encode them."""
    if len(train.classes) != pipeline_num_classes(pipeline):
        raise UserError(
            f"the pipeline has {pipeline_num_classes(pipeline)} classes but the data has {len(train.classes)}; "
            "pass data with the pipeline's classes"
        )
    return DiffusionTask(
        preset, pipeline_denoiser(pipeline).eval(), DDPMScheduler.from_config(pipeline.scheduler.config), train, test, vae=pipeline.vae,
        cache_dir=cache_root, encoded_data=encoded_data, id2label=pipeline.config.get("id2label") or named_labels(train.classes),
    )


def named_labels(classes: list[str]) -> dict[str, str] | None:
    """``id2label`` of data whose class names are not their ids (a user's folders), else None."""
    return {str(i): name for i, name in enumerate(classes)} if classes != [str(i) for i in range(len(classes))] else None


def load_diffusion_task(
    preset: DiffusionPreset,
    train: LabeledDataset,
    test: LabeledDataset,
    data_id: str,
    *,
    pretrained: str | None,
    cache_root: Path,
    accelerator: Accelerator,
) -> DiffusionTask:
    """The preset's diffusion task on real data with weights as ``load_diffusion_pipeline`` finds them."""
    pipeline = load_diffusion_pipeline(preset, pretrained=pretrained, data=(train, test, data_id), cache_root=cache_root,
                                       accelerator=accelerator)
    return task_from_pipeline(preset, pipeline, train, test, cache_root=cache_root)


def _cached_or_pretrained(preset, train, test, data_id, root: Path, accelerator: Accelerator) -> Pipeline:
    entry = pretrained_entry(root, preset, data_id, PRETRAIN_SEED, numerics_tag(accelerator))

    def pretrain_and_save() -> None:
        task = DiffusionTask(preset, build_denoiser(preset, len(train.classes)), build_noise_scheduler(preset), train, test)
        cfg = TrainConfig.from_recipe(preset.train, seed=PRETRAIN_SEED, log_every=50)
        trained = train_from_scratch(task, train, cfg, accelerator, desc=f"pretraining {preset.name}").model
        if accelerator.is_main_process:
            save_pipeline(pipeline_for(task, trained.cpu()), entry)

    return cached_or_built(entry, "model_index.json", pretrain_and_save, ClassConditionalPipeline.from_pretrained, accelerator,
                           f"{preset.name} on {data_id}")
