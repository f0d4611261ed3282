"""A text-to-image preset's pipeline and task: ``--pretrained`` (a ``StableDiffusionPipeline`` folder or hub id), the
preset's hub id, or the tiny offline pipeline pretrained on the captioned digits on first use and cached."""

from __future__ import annotations

import json

from pathlib import Path

from accelerate import Accelerator
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from genunlearn.data.captioned_digits import VOCABULARY, captioned_digits_split
from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.engine.training import TrainConfig, train_from_scratch
from genunlearn.errors import UserError
from genunlearn.models.presets import TextToImagePreset
from genunlearn.models.tiny_sd import build_tiny_sd, build_tiny_sdxl
from genunlearn.models.tiny_sd3 import build_tiny_sd3
from genunlearn.precision import numerics_tag
from genunlearn.storage.cache import PRETRAIN_SEED, cached_or_built, pretrained_entry
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.text_to_image import AutoencoderTraining, JointTextToImageTraining, latent_shift_and_scale
from genunlearn.tasks.text_to_image_pipelines import text_to_image_task

CAPTIONED_DIGITS = "captioned-digits8"  # the data id of the embedded captioned digits (seed 0)


def load_captioned_digits(preset: TextToImagePreset) -> tuple[LabeledDataset, LabeledDataset, str]:
    """``(train, test, data_id)`` of the preset's embedded data."""
    if preset.dataset != "captioned-digits":
        raise UserError(f"model {preset.name} is trained on {preset.dataset}, which is not embedded; pass --pretrained DIR")
    train, test = captioned_digits_split(seed=0)
    return train, test, CAPTIONED_DIGITS


def build_tiny_pipeline(preset: TextToImagePreset, seed: int) -> DiffusionPipeline:
    """The preset's tiny pipeline of its ``family``, freshly initialised from ``seed``, its tokenizers knowing the
    captions' words."""
    if preset.family == "sd":
        return build_tiny_sd(VOCABULARY, **preset.model_args, beta_schedule=preset.beta_schedule, seed=seed)
    if preset.family == "sdxl":
        return build_tiny_sdxl(VOCABULARY, **preset.model_args, seed=seed)
    if preset.family == "sd3":
        return build_tiny_sd3(VOCABULARY, **preset.model_args, seed=seed)
    raise UserError(f"preset {preset.name} has unknown family {preset.family!r}; use sd, sdxl or sd3")


def pretrain_tiny_sd(preset: TextToImagePreset, train: LabeledDataset, test: LabeledDataset,
                     accelerator: Accelerator) -> DiffusionPipeline:
    """The tiny pipeline of ``preset`` trained on ``train``: the VAE (``preset.vae_train``), its latent scaling factor
    (and SD3's shift) from the training images, then the denoiser on the VAE's latents with caption dropout
    (``preset.train``), from scratch with its text encoders when ``preset.train_text_encoder`` (else they stay as
    built: frozen, random)."""
    pipeline = build_tiny_pipeline(preset, PRETRAIN_SEED)
    vae_cfg = TrainConfig.from_recipe(preset.vae_train, seed=PRETRAIN_SEED, log_every=50)
    vae = train_from_scratch(AutoencoderTraining(preset.name, pipeline.vae), train, vae_cfg, accelerator,
                             desc=f"pretraining {preset.name}'s VAE").model.cpu().eval()
    shift, scale = latent_shift_and_scale(vae, train.images, seed=PRETRAIN_SEED)
    vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if preset.family == "sd3" else {}))
    pipeline.vae = vae
    task = text_to_image_task(pipeline, preset, None, train, test)
    denoiser_name = "transformer" if preset.family == "sd3" else "unet"
    unet_cfg = TrainConfig.from_recipe(preset.train, seed=PRETRAIN_SEED, log_every=50)
    if not preset.train_text_encoder:
        trained = train_from_scratch(task, train, unet_cfg, accelerator, desc=f"pretraining {preset.name}").model
        setattr(pipeline, denoiser_name, trained.cpu().eval())
        return pipeline
    trained = train_from_scratch(JointTextToImageTraining(task), train, unet_cfg, accelerator,
                                 desc=f"pretraining {preset.name}").model.cpu().eval()
    setattr(pipeline, denoiser_name, trained.denoiser)
    for name, encoder in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), trained.text_encoders):
        setattr(pipeline, name, encoder)
    return pipeline


LOADABLE = {cls.__name__: cls for cls in (StableDiffusionXLPipeline, StableDiffusion3Pipeline)}  # beside SD 1.x/2.x


def load_sd_pipeline(source: str | Path) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline:
    """A ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline`` folder
    (``save_pretrained``; the class its ``model_index.json`` names), or a Stable Diffusion hub id (needs network); a
    UserError otherwise."""
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass a StableDiffusionPipeline folder")
    named = json.loads((path / "model_index.json").read_text()).get("_class_name") if path.exists() else None
    kind = named if named in LOADABLE else "StableDiffusionPipeline"
    try:
        if kind in LOADABLE:
            return LOADABLE[kind].from_pretrained(str(source), local_files_only=True)
        return StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=path.exists())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"could not load a {kind} from {source} ({str(exc).splitlines()[0][:100]}); pass a "
                        "folder written by save_pretrained, or download the hub id on a connected machine") from None


def load_text_to_image_pipeline(preset: TextToImagePreset, *, pretrained: str | None, cache_root: Path,
                                accelerator: Accelerator) -> DiffusionPipeline:
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
