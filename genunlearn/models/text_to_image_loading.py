"""A text-to-image preset's pipeline and task: ``--pretrained`` (a ``StableDiffusionPipeline`` folder or hub id), the
preset's hub id, or the tiny offline pipeline pretrained on the captioned digits on first use and cached."""

from __future__ import annotations

import json

from pathlib import Path

from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from genunlearn.data.captioned_digits import VOCABULARY, captioned_digits_split
from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.engine.training import TrainConfig, train_from_scratch
from genunlearn.errors import UserError
from genunlearn.models.presets import TextToImagePreset
from genunlearn.models.tiny_sd import build_tiny_sd
from genunlearn.precision import numerics_tag
from genunlearn.storage.cache import PRETRAIN_SEED, cached_or_built, pretrained_entry
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.text_to_image import (AutoencoderTraining, JointTextToImageTraining, TextToImageTask,
                                            latent_scaling_factor)

CAPTIONED_DIGITS = "captioned-digits8"  # the data id of the embedded captioned digits (seed 0)


def load_captioned_digits(preset: TextToImagePreset) -> tuple[LabeledDataset, LabeledDataset, str]:
    """``(train, test, data_id)`` of the preset's embedded data."""
    if preset.dataset != "captioned-digits":
        raise UserError(f"model {preset.name} is trained on {preset.dataset}, which is not embedded; pass --pretrained DIR")
    train, test = captioned_digits_split(seed=0)
    return train, test, CAPTIONED_DIGITS


def pretrain_tiny_sd(preset: TextToImagePreset, train: LabeledDataset, test: LabeledDataset,
                     accelerator: Accelerator) -> StableDiffusionPipeline:
    """The tiny pipeline of ``preset`` trained on ``train``: the VAE (``preset.vae_train``), its latent scaling factor
    from the training images, then the UNet on the VAE's latents with caption dropout (``preset.train``), from scratch
    with its text encoder when ``preset.train_text_encoder`` (else the encoder stays as built: frozen, random)."""
    pipeline = build_tiny_sd(VOCABULARY, **preset.model_args, beta_schedule=preset.beta_schedule, seed=PRETRAIN_SEED)
    vae_cfg = TrainConfig.from_recipe(preset.vae_train, seed=PRETRAIN_SEED, log_every=50)
    vae = train_from_scratch(AutoencoderTraining(preset.name, pipeline.vae), train, vae_cfg, accelerator,
                             desc=f"pretraining {preset.name}'s VAE").model.cpu().eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, train.images, seed=PRETRAIN_SEED))
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    task_class = JointTextToImageTraining if preset.train_text_encoder else TextToImageTask
    task = task_class(preset, pipeline.unet, vae, pipeline.text_encoder, pipeline.tokenizer, scheduler, train, test)
    unet_cfg = TrainConfig.from_recipe(preset.train, seed=PRETRAIN_SEED, log_every=50)
    trained = train_from_scratch(task, train, unet_cfg, accelerator, desc=f"pretraining {preset.name}").model.cpu().eval()
    unet, text_encoder = (trained.unet, trained.text_encoder) if preset.train_text_encoder else (trained, pipeline.text_encoder)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=pipeline.tokenizer, unet=unet,
                                   scheduler=pipeline.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_sd_pipeline(source: str | Path) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder (``save_pretrained``; the class its
    ``model_index.json`` names), or a Stable Diffusion hub id (needs network); a UserError otherwise."""
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass a StableDiffusionPipeline folder")
    xl = path.exists() and json.loads((path / "model_index.json").read_text()).get("_class_name") == "StableDiffusionXLPipeline"
    try:
        if xl:
            return StableDiffusionXLPipeline.from_pretrained(str(source), local_files_only=True)
        return StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=path.exists())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        kind = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
        raise UserError(f"could not load a {kind} from {source} ({str(exc).splitlines()[0][:100]}); pass a "
                        "folder written by save_pretrained, or download the hub id on a connected machine") from None


def load_text_to_image_pipeline(preset: TextToImagePreset, *, pretrained: str | None, cache_root: Path,
                                accelerator: Accelerator) -> StableDiffusionPipeline:
    """``pretrained``, else the preset's hub id, else its tiny pipeline pretrained on its data (first use, then cached)."""
    source = pretrained or preset.hub_id
    if source is not None:
        return load_sd_pipeline(source)
    train, test, data_id = load_captioned_digits(preset)
    entry = pretrained_entry(cache_root, preset, data_id, PRETRAIN_SEED, numerics_tag(accelerator))

    def pretrain_and_save() -> None:
        pipeline = pretrain_tiny_sd(preset, train, test, accelerator)
        if accelerator.is_main_process:
            save_pipeline(pipeline, entry)

    return cached_or_built(entry, "model_index.json", pretrain_and_save, load_sd_pipeline, accelerator,
                           f"{preset.name} on {data_id}")
