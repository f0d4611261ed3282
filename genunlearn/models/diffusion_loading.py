"""Diffusion pipelines and tasks: a pipeline folder or hub id given, the preset's hub id, or pretrained locally (cached)."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.errors import UserError
from genunlearn.storage.cache import PRETRAIN_SEED, pretrain_once, pretrained_entry
from genunlearn.models.pipeline import (
    ClassConditionalPipeline,
    Pipeline,
    make_pipeline,
    pipeline_denoiser,
    pipeline_num_classes,
)
from genunlearn.models.presets import DiffusionPreset
from genunlearn.storage.files import make_readable, make_staging_dir
from genunlearn.tasks.diffusion import DiffusionTask, build_denoiser, build_noise_scheduler
from genunlearn.training import TrainConfig, train_from_scratch

PIPELINE_CLASSES = {"ClassConditionalPipeline": ClassConditionalPipeline, "DiTPipeline": DiTPipeline}


def pipeline_for(task: DiffusionTask, denoiser=None) -> Pipeline:
    """The task's model (or ``denoiser``) as a sampling pipeline with a DDIM scheduler on the same noise schedule."""
    return make_pipeline(
        denoiser if denoiser is not None else task.model,
        DDIMScheduler.from_config(task.scheduler.config),
        task.vae,
        task.num_classes,
        id2label=task.id2label,
    )


def sampler_for(pipeline: Pipeline) -> Pipeline:
    """``pipeline`` re-assembled with a DDIM scheduler on its own noise schedule (how genunlearn samples)."""
    return make_pipeline(pipeline_denoiser(pipeline), DDIMScheduler.from_config(pipeline.scheduler.config), pipeline.vae,
                         pipeline_num_classes(pipeline), id2label=pipeline.config.get("id2label"))


def save_pipeline(pipeline: Pipeline, directory: Path) -> None:
    """``save_pretrained`` into a staging folder beside ``directory``, then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory.parent, directory.name)
    pipeline.save_pretrained(staging)
    make_readable(staging)
    staging.replace(directory)


def load_pipeline(source: str | Path) -> Pipeline:
    """A pipeline folder written by ``save_pretrained`` (ours or a ``DiTPipeline``), or a Hugging Face hub id of
    one (downloaded into the hub cache); a UserError naming the fix otherwise."""
    path = Path(source)
    if not path.exists() and str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        path = _download(str(source))
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path} is not a diffusion pipeline folder (no model_index.json); pass a folder written by save_pretrained")
    config = json.loads(index.read_text())
    class_name = config.get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise UserError(f"{path} holds a {class_name}, not a class-conditional pipeline; use a DiTPipeline or a genunlearn pipeline folder")
    try:
        pipeline = PIPELINE_CLASSES[class_name].from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"could not load the pipeline in {path} ({str(exc).splitlines()[0][:100]}); re-save it with save_pretrained") from None
    if config.get("id2label"):
        pipeline.register_to_config(id2label=config["id2label"])  # DiTPipeline uses but does not keep it
    return pipeline


def _download(hub_id: str) -> Path:
    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except (OSError, HfHubHTTPError) as exc:
        raise UserError(
            f"could not fetch {hub_id} from the Hugging Face Hub ({type(exc).__name__}: no network or no such repo?); "
            f"on a connected machine run `hf download {hub_id} --local-dir DIR`, copy DIR here and pass --pretrained DIR"
        ) from None


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
        cache_dir=cache_root, encoded_data=encoded_data, id2label=pipeline.config.get("id2label"),
    )


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
    entry = pretrained_entry(root, preset, data_id, PRETRAIN_SEED)

    def pretrain_and_save() -> None:
        task = DiffusionTask(preset, build_denoiser(preset, len(train.classes)), build_noise_scheduler(preset), train, test)
        cfg = TrainConfig.from_recipe(preset.train, seed=PRETRAIN_SEED, log_every=50)
        trained = train_from_scratch(task, train, cfg, accelerator, desc=f"pretraining {preset.name}").model
        if accelerator.is_main_process:
            save_pipeline(pipeline_for(task, trained.cpu()), entry)

    pretrain_once(entry, "model_index.json", pretrain_and_save, accelerator, f"{preset.name} on {data_id}")
    try:
        return ClassConditionalPipeline.from_pretrained(entry)
    except (OSError, ValueError) as exc:
        raise UserError(f"cached pipeline in {entry} is corrupt ({str(exc)[:60]}); delete that folder to pretrain again") from None
