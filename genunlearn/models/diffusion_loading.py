"""Diffusion tasks: a ``ClassConditionalPipeline`` folder given, cached, or pretrained now on the preset's data."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from diffusers import DDIMScheduler

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError
from genunlearn.models.cache import PRETRAIN_SEED, pretrain_once, pretrained_entry
from genunlearn.models.pipeline import ClassConditionalPipeline
from genunlearn.models.presets import DiffusionPreset
from genunlearn.models.store import make_staging_dir
from genunlearn.tasks.diffusion import DiffusionTask, build_denoiser, build_noise_scheduler
from genunlearn.training import TrainConfig, train_from_scratch



def pipeline_for(task: DiffusionTask, denoiser=None) -> ClassConditionalPipeline:
    """The task's model (or ``denoiser``) as a sampling pipeline with a DDIM scheduler on the same noise schedule."""
    return ClassConditionalPipeline(
        denoiser=denoiser if denoiser is not None else task.model,
        scheduler=DDIMScheduler.from_config(task.scheduler.config),
        vae=task.vae,
        num_classes=task.num_classes,
    )


def save_pipeline(pipeline: ClassConditionalPipeline, directory: Path) -> None:
    """``save_pretrained`` into a staging folder beside ``directory``, then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory.parent, directory.name)
    pipeline.save_pretrained(staging)
    staging.replace(directory)


def load_pipeline(path: str | Path) -> ClassConditionalPipeline:
    """A pipeline folder written by ``save_pretrained``; a UserError if it is not one."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusion pipeline folder (no model_index.json); pass a folder written by save_pretrained")
    try:
        return ClassConditionalPipeline.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"could not load the pipeline in {path} ({str(exc).splitlines()[0][:100]}); re-save it with save_pretrained") from None


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
    """The preset's diffusion task with weights from ``pretrained`` (a pipeline folder) or the cache (pretrained on first use)."""
    scheduler = build_noise_scheduler(preset)
    if pretrained is not None:
        pipeline = load_pipeline(pretrained)
    else:
        pipeline = _cached_or_pretrained(preset, train, test, data_id, scheduler, cache_root, accelerator)
    denoiser = pipeline.denoiser.eval()
    return DiffusionTask(preset, denoiser, scheduler, train, test, vae=pipeline.vae, cache_dir=cache_root)


def _cached_or_pretrained(preset, train, test, data_id, scheduler, root: Path, accelerator: Accelerator) -> ClassConditionalPipeline:
    entry = pretrained_entry(root, preset, data_id, PRETRAIN_SEED)

    def pretrain_and_save() -> None:
        task = DiffusionTask(preset, build_denoiser(preset, len(train.classes)), scheduler, train, test)
        cfg = TrainConfig.from_recipe(preset.train, seed=PRETRAIN_SEED, log_every=50)
        trained = train_from_scratch(task, train, cfg, accelerator, desc=f"pretraining {preset.name}").model
        if accelerator.is_main_process:
            save_pipeline(pipeline_for(task, trained.cpu()), entry)

    pretrain_once(entry, "model_index.json", pretrain_and_save, accelerator, f"{preset.name} on {data_id}")
    try:
        return ClassConditionalPipeline.from_pretrained(entry)
    except (OSError, ValueError) as exc:
        raise UserError(f"cached pipeline in {entry} is corrupt ({str(exc)[:60]}); delete that folder to pretrain again") from None
