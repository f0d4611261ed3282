"""Diffusion pipeline folders: written atomically, with their code where diffusers lacks it; read from a folder or hub id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from genunlearn.errors import UserError
from genunlearn.models import class_conditional
from genunlearn.models.held import denoiser_kind, diffusers_parts
from genunlearn.models.pipeline import ClassConditionalPipeline, Pipeline
from genunlearn.storage.files import make_staging_dir, publish_staging

PIPELINE_CLASSES = {"ClassConditionalPipeline": ClassConditionalPipeline, "DiTPipeline": DiTPipeline}
PIPELINE_CODE = "pipeline.py"  # diffusers' name for a custom pipeline's code file


def save_pipeline(pipeline: Pipeline, directory: Path) -> None:
    """``save_pretrained`` into a staging folder beside ``directory``, then rename it into place. A
    ``ClassConditionalPipeline`` gets its own code as ``pipeline.py``, so diffusers alone loads the folder:
    ``DiffusionPipeline.from_pretrained(directory, custom_pipeline=directory / "pipeline.py", trust_remote_code=True)``."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory.parent, directory.name)
    pipeline.save_pretrained(staging)
    if isinstance(pipeline, ClassConditionalPipeline):
        shutil.copyfile(class_conditional.__file__, staging / PIPELINE_CODE)
    publish_staging(staging, directory)


def load_pipeline(source: str | Path) -> Pipeline:
    """A pipeline folder written by ``save_pretrained`` (ours or a ``DiTPipeline``), a Hugging Face hub id of one
    (downloaded into the hub cache), or a class-conditional denoiser as users hold it (``models.held.diffusers_parts``:
    a ``UNet2DModel``/``DiTTransformer2DModel`` folder with or without its scheduler, a ``DDPMPipeline`` folder),
    wrapped in a ``ClassConditionalPipeline``; a UserError naming the fix otherwise."""
    path = Path(source)
    if not path.exists() and str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        path = _download(str(source))
    index = path / "model_index.json"
    if not index.is_file():
        parts = diffusers_parts(path) if path.is_dir() else None
        if parts is None:
            raise UserError(f"{path} is not a diffusion pipeline folder (no model_index.json); pass a folder written by save_pretrained")
        return _held_denoiser_pipeline(parts)
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{index} is not valid JSON; re-save the pipeline with save_pretrained") from None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if isinstance(class_name, list):  # diffusers' custom-pipeline form: [module file, class name]
        raise UserError(f"{path} names a custom pipeline {class_name}, whose code genunlearn does not run; pass its "
                        "denoiser in a DiTPipeline or genunlearn pipeline folder")
    wrapped = isinstance(class_name, str) and class_name not in PIPELINE_CLASSES  # a DDPMPipeline: its denoiser, wrapped
    parts = diffusers_parts(path) if wrapped else None
    if parts is not None:
        return _held_denoiser_pipeline(parts)
    if not isinstance(class_name, str) or class_name not in PIPELINE_CLASSES:
        raise UserError(f"{path} holds a {class_name}, not a class-conditional pipeline; use a DiTPipeline or a genunlearn pipeline folder")
    try:
        pipeline = PIPELINE_CLASSES[class_name].from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"could not load the pipeline in {path} ({str(exc).splitlines()[0][:100]}); re-save it with save_pretrained") from None
    if config.get("id2label"):
        pipeline.register_to_config(id2label=config["id2label"])  # DiTPipeline uses but does not keep it
    return pipeline


def _held_denoiser_pipeline(parts: dict) -> ClassConditionalPipeline:
    """A ``ClassConditionalPipeline`` over a user's denoiser folder, its scheduler (without one: diffusers' default
    ``DDPMScheduler``, linear betas over 1000 steps, as diffusers' training scripts use) and VAE; the denoiser's last
    class embedding is the null class of guidance, as genunlearn trains them."""
    denoiser_class = getattr(diffusers, parts["class_name"])  # one of models.held.DENOISERS
    try:
        denoiser = denoiser_class.from_pretrained(parts["denoiser"])
        scheduler = DDPMScheduler.from_pretrained(parts["scheduler"]) if parts["scheduler"] else DDPMScheduler()
        vae = AutoencoderKL.from_pretrained(parts["vae"]) if parts["vae"] else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"could not load the model in {parts['denoiser']} ({str(exc).splitlines()[0][:200]}); re-save it "
                        "with save_pretrained") from None
    _, num_classes = denoiser_kind(denoiser)
    return ClassConditionalPipeline(denoiser=denoiser, scheduler=scheduler, vae=vae, num_classes=num_classes)


def _download(hub_id: str) -> Path:
    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except (OSError, HfHubHTTPError) as exc:
        raise UserError(
            f"could not fetch {hub_id} from the Hugging Face Hub ({type(exc).__name__}: no network or no such repo?); "
            f"on a connected machine run `hf download {hub_id} --local-dir DIR`, copy DIR here and pass --pretrained DIR"
        ) from None
