"""Presets for models as users hold them: a diffusers model or pipeline folder, a timm folder or a bare timm name.

The preset is read from the model's own config (kind, classes, channels, image size, noise schedule, normalisation)
as the mapping a preset YAML would hold (``models.presets`` builds it); the defaults of what a preset does not say
come from ``family_defaults``, the one place the library (``tasks.user``) and the command line take them from."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

from genunlearn.errors import UserError

# a denoiser's losses, recipes and method defaults are those of the reference its architecture comes from
REFERENCE_PRESETS = {"unet": "ddpm-cifar10", "dit": "dit-xl"}
FAMILY_KEYS = ("class_dropout", "sampling", "objective", "train", "methods")  # what a diffusion family sets
TEXT_TO_IMAGE_REFERENCE = "sd-1.5"  # a user's Stable Diffusion pipeline gets its settings, as concept_task gives them
DENOISERS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "dit"}
DENOISER_FOLDERS = ("unet", "transformer", "denoiser")  # DDPMPipeline, DiTPipeline, ClassConditionalPipeline
PIPELINES = ("DDPMPipeline", "DDIMPipeline", "DiTPipeline", "ClassConditionalPipeline")


def family_defaults(kind: str, architecture: str | None = None) -> dict:
    """The settings a model of ``kind`` (and diffusion ``architecture``) gets where its preset is silent: a diffusion
    model its reference preset's ``FAMILY_KEYS`` (the DDPM references' for a UNet, SFR-on's DiT for a DiT); a
    classifier the dataclass defaults (the classification references'), so nothing."""
    if kind != "diffusion":
        return {}
    if architecture not in REFERENCE_PRESETS:
        raise UserError(f"architecture must be one of {', '.join(REFERENCE_PRESETS)}, got {architecture!r}")
    reference = _built_in(REFERENCE_PRESETS[architecture])
    return {key: reference[key] for key in FAMILY_KEYS if key in reference}


def _built_in(name: str) -> dict:
    return yaml.safe_load((resources.files("genunlearn") / "configs" / "models" / f"{name}.yaml").read_text())


def with_family_defaults(raw: dict) -> dict:
    """A preset's YAML mapping with its family's defaults under what it sets itself, key by key inside the mappings
    (``train: {lr: ...}`` keeps the family's optimizer; ``methods: {salun: {steps: 7}}`` the family's other SalUn
    settings and its other methods)."""
    merged = family_defaults(raw.get("kind", "classifier"), raw.get("architecture"))
    for key, value in raw.items():
        family = merged.get(key)
        if key == "methods" and isinstance(family, dict) and isinstance(value, dict):
            value = {**family, **{name: {**family.get(name, {}), **(settings or {})} for name, settings in value.items()}}
        elif isinstance(family, dict) and isinstance(value, dict):
            value = {**family, **value}
        merged[key] = value
    return merged


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not readable JSON; re-save the model with save_pretrained") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a config (a JSON object); re-save the model with save_pretrained")
    return value


def diffusers_parts(folder: Path) -> dict | None:
    """``{"denoiser", "scheduler", "vae"}`` folders (``scheduler``/``vae`` None when absent) and the denoiser's
    ``class_name`` of a diffusers class-conditional model as users hold it: a ``UNet2DModel``/``DiTTransformer2DModel``
    folder (its scheduler in ``scheduler/`` inside or beside it, or a ``scheduler_config.json`` in it; else none), a
    folder holding ``unet/`` (or ``transformer/``) and ``scheduler/``, or a ``DDPMPipeline``/``DiTPipeline``/genunlearn
    pipeline folder. None: not such a folder."""
    index = folder / "model_index.json"
    if index.is_file() and _json(index).get("_class_name") not in PIPELINES:
        return None
    if not index.is_file() and (folder / "config.json").is_file():
        denoiser = folder
    else:
        found = [folder / name for name in DENOISER_FOLDERS if (folder / name / "config.json").is_file()]
        if not found:
            return None
        denoiser = found[0]
    class_name = _json(denoiser / "config.json").get("_class_name")
    if class_name not in DENOISERS:
        return None
    candidates = [denoiser / "scheduler", denoiser.parent / "scheduler", denoiser]
    scheduler = next((c for c in candidates if (c / "scheduler_config.json").is_file()), None)
    vae = folder / "vae" if (folder / "vae" / "config.json").is_file() else None
    return {"denoiser": denoiser, "scheduler": scheduler, "vae": vae, "class_name": class_name}


def diffusion_folder_preset(folder: Path, parts: dict) -> dict:
    """The preset mapping of a diffusers denoiser folder (see ``diffusers_parts``): its architecture's family defaults, its
    config as ``model_args``, its image size and channels (decoded by its VAE if it has one) and noise schedule, the
    folder itself as the weights (``hub_id``); no embedded data (``--data``, or data-free) and no default judge."""
    config = _json(parts["denoiser"] / "config.json")
    architecture = DENOISERS[parts["class_name"]]
    schedule = _json(parts["scheduler"] / "scheduler_config.json") if parts["scheduler"] else {}
    size, channels = config.get("sample_size"), config.get("in_channels")
    if parts["vae"] is not None:
        vae = _json(parts["vae"] / "config.json")
        size, channels = vae.get("sample_size", size), vae.get("in_channels", 3)
    if not isinstance(size, int) or not isinstance(channels, int):
        raise UserError(f"{parts['denoiser'] / 'config.json'} has no integer sample_size and in_channels; re-save it with save_pretrained")
    return {
        **family_defaults("diffusion", architecture),
        "name": folder.name, "description": f"{config['_class_name']} from {folder}", "kind": "diffusion",
        "architecture": architecture, "hub_id": str(folder), "dataset": "user", "image_size": size, "channels": channels,
        # how many other classes stand for the retain set in data-free runs: the reference's (dit-xl: 10 of 1000)
        "remain_classes": _built_in(REFERENCE_PRESETS[architecture]).get("remain_classes"),
        "model_args": {k: v for k, v in config.items() if not k.startswith("_")}, "eval_classifier": "",
        "num_train_timesteps": schedule.get("num_train_timesteps", 1000), "beta_schedule": schedule.get("beta_schedule", "linear"),
    }


TEXT_TO_IMAGE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}


def stable_diffusion_folder_preset(folder: Path, kind: str = "StableDiffusionPipeline") -> dict:
    """The preset mapping of a ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline``: ``kind``) folder: the ``sd-1.5`` preset's method, sampling and judge settings (the
    references' Stable Diffusion ones), its own family, image size, channels and noise schedule, the folder as the
    weights."""
    vae = _json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    schedule = _json(folder / "scheduler" / "scheduler_config.json") if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    reference = _built_in(TEXT_TO_IMAGE_REFERENCE)
    return {**reference, "name": folder.name, "description": f"{kind} from {folder}", "hub_id": str(folder),
            "family": TEXT_TO_IMAGE_FAMILIES[kind],
            "image_size": vae.get("sample_size", reference["image_size"]), "channels": vae.get("in_channels", reference["channels"]),
            "beta_schedule": schedule.get("beta_schedule", reference["beta_schedule"]),
            "num_train_timesteps": schedule.get("num_train_timesteps", 1000)}


def timm_folder_preset(folder: Path) -> dict:
    """The preset mapping of a timm folder (``config.json`` with ``architecture``, e.g. written by ``save_classifier`` or
    ``timm.models.save_for_hf``): its architecture, input size, channels and mean/std; the folder as the weights."""
    config = _json(folder / "config.json")
    return {"name": folder.name, "kind": "classifier", "timm_name": config["architecture"],
            "description": f"timm {config['architecture']} from {folder}", "hub_id": f"local-dir:{folder}", "dataset": "user",
            **_timm_preprocessing(config.get("pretrained_cfg", {}))}


def timm_name_preset(name: str, timm_name: str) -> dict:
    """The preset mapping of a bare timm model name: timm's own defaults (its ``pretrained_cfg``: input size, channels, mean/std), trained on
    ``--data``; its weights from ``--pretrained`` (a file, or ``hf-hub:`` id), else trained there from scratch."""
    import timm

    cfg = timm.get_pretrained_cfg(timm_name)
    return {"name": name, "kind": "classifier", "timm_name": timm_name,
            "description": f"timm {timm_name} (timm's input size and normalisation)", "dataset": "user",
            **_timm_preprocessing(cfg.to_dict() if cfg is not None else {})}


def denoiser_kind(model) -> tuple[str, int]:
    """``(architecture, number of classes)`` of a class-conditional diffusers denoiser (a UNet2DModel's last class
    embedding is the null class of guidance)."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    if isinstance(model, UNet2DModel):
        if not model.config.num_class_embeds or model.config.num_class_embeds < 2:
            raise UserError("the UNet2DModel has no class embeddings (num_class_embeds); genunlearn forgets classes of class-conditional models")
        return "unet", model.config.num_class_embeds - 1
    if isinstance(model, DiTTransformer2DModel):
        return "dit", model.config.num_embeds_ada_norm
    raise UserError(f"{type(model).__name__} is not a class-conditional UNet2DModel or DiTTransformer2DModel (or a pipeline of one)")


def _timm_preprocessing(pretrained_cfg: dict) -> dict:
    """A timm ``pretrained_cfg``'s input size, channels and mean/std as preset fields (timm's defaults where unset)."""
    channels, _, size = pretrained_cfg.get("input_size", (3, 224, 224))
    return {"image_size": int(size), "channels": int(channels), "mean": _per_channel(pretrained_cfg.get("mean", 0.5)),
            "std": _per_channel(pretrained_cfg.get("std", 0.5))}


def _per_channel(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def is_timm_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a timm model in timm's hub layout (``config.json`` naming its ``architecture``)."""
    return (folder / "config.json").is_file() and "architecture" in _json(folder / "config.json")


def folder_preset(folder: Path) -> dict:
    """The preset mapping of a model folder as users hold it (a diffusers class-conditional model or pipeline, a
    ``StableDiffusionPipeline``, a timm folder); a UserError naming what is accepted."""
    parts = diffusers_parts(folder)
    if parts is not None:
        return diffusion_folder_preset(folder, parts)
    if is_timm_folder(folder):
        return timm_folder_preset(folder)
    if (folder / "model_index.json").is_file():
        kind = _json(folder / "model_index.json").get("_class_name")
        if kind in TEXT_TO_IMAGE_FAMILIES:
            return stable_diffusion_folder_preset(folder, kind)
        raise UserError(f"{folder} holds a {kind}, which genunlearn does not unlearn yet; pass a class-conditional "
                        "pipeline, a StableDiffusion(XL/3)Pipeline or a timm folder")
    raise UserError(f"{folder} is not a model folder genunlearn reads: a diffusers UNet2DModel/DiTTransformer2DModel folder "
                    "(with or without scheduler/), a DDPMPipeline/DiTPipeline folder, or a timm folder (config.json with "
                    "architecture, e.g. from save_classifier)")
