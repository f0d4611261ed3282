"""What every field of a preset YAML means: ``FIELD_DOCS``, checked against the preset dataclasses (a field without a
line, or a line without a field, fails a test); ``render`` makes the tables of ``docs/presets.md`` from both
(``python benchmarks/tables.py`` writes them there)."""

from __future__ import annotations

import dataclasses
import typing

from genunlearn.models.presets import (
    ClassifierPreset,
    ClassifierRecipe,
    DiffusionObjective,
    DiffusionPreset,
    SamplingDefaults,
    TextToImagePreset,
    TrainRecipe,
)

COMMON = {
    "name": "the preset's name (letters, digits, `.`, `_`, `-`; it names cache folders)",
    "description": "one line shown by `genunlearn models`",
    "kind": "`classifier`, `diffusion` or `text-to-image`; picks the dataclass and the model kind's adapter",
    "model_args": "keyword arguments of the model's constructor (timm's `create_model`, diffusers' model classes)",
    "dataset": "the data it is trained on: `digits` / `captioned-digits` (embedded) or a name that needs `--data`",
    "image_size": "the side of the square images the model sees, in pixels (data is resized and centre-cropped to it)",
    "channels": "image channels (1: grey, 3: RGB)",
    "train": "how it is trained from scratch (pretraining, and `retrain` on D_r): a recipe mapping, fields below",
    "methods": "per-method settings over each method's defaults, e.g. `sfron: {steps: 50}` (see `genunlearn methods NAME`)",
    "hub_id": "weights to start from instead of pretraining here: a hub id, or a local folder (timm: `local-dir:DIR`)",
    "eval_classifier": "the classifier that judges generated samples: a classifier preset, a YAML file, a timm folder "
                       "or a timm name (empty: none, pass `--eval-classifier`)",
    "num_train_timesteps": "the noise schedule's number of steps T",
    "beta_schedule": "the noise schedule's betas (diffusers' `linear`, `scaled_linear`, `squaredcos_cap_v2`)",
    "sampling": "how it samples by default: a mapping, fields below",
}
FIELD_DOCS: dict[type, dict[str, str]] = {
    ClassifierPreset: {
        **{k: COMMON[k] for k in ("name", "description", "kind", "model_args", "dataset", "image_size", "channels",
                                  "train", "methods", "hub_id")},
        "timm_name": "the timm architecture (any `timm.list_models()` name, or `genunlearn_cnn`)",
        "stem": "`cifar`: a 3x3 stride-1 first convolution and no max-pool (ResNets on 8-32 px images); null: timm's",
        "peft": "train only this parameter scope on a fixed random backbone (`batchnorm+head`, `prompts+head`, ...); "
                "Fast-NTK scrubs such models",
        "mean": "per-channel mean (one value for all) subtracted from [0, 1] pixels; default 0.5",
        "std": "per-channel standard deviation (one value for all) the pixels are divided by; default 0.5 (so [-1, 1])",
    },
    DiffusionPreset: {
        **{k: COMMON[k] for k in ("name", "description", "kind", "model_args", "dataset", "image_size", "channels",
                                  "train", "methods", "hub_id", "eval_classifier", "num_train_timesteps",
                                  "beta_schedule", "sampling")},
        "architecture": "`unet` (diffusers `UNet2DModel`) or `dit` (`DiTTransformer2DModel`); what it leaves unset "
                        "comes from its family's reference preset (`ddpm-cifar10`, `dit-xl`)",
        "remain_classes": "how many other classes (chosen by seed) stand for the retain set in data-free runs and "
                          "evaluation (null: all)",
        "class_dropout": "the probability a training label is replaced by the null class (classifier-free guidance)",
        "objective": "how unlearning computes its losses, as the reference code does: a mapping, fields below",
    },
    TextToImagePreset: {
        **{k: COMMON[k] for k in ("name", "description", "kind", "model_args", "dataset", "image_size", "channels",
                                  "train", "methods", "hub_id", "eval_classifier", "num_train_timesteps",
                                  "beta_schedule", "sampling")},
        "family": "the tiny pipeline's family: `sd` (StableDiffusionPipeline), `sdxl` (StableDiffusionXLPipeline) or `sd3` "
                  "(StableDiffusion3Pipeline, flow matching)",
        "vae_train": "how the tiny pipeline's VAE is trained before its UNet (a recipe mapping)",
        "train_text_encoder": "train the text encoder with the UNet (the tiny pipeline's recipe)",
        "retain_prompts": "the prompts an erasure keeps by default (those naming the erased concept's class are left out)",
    },
    TrainRecipe: {
        "epochs": "passes over the data",
        "batch_size": "samples per step, over all processes",
        "lr": "peak learning rate",
        "optimizer": "`sgd`, `adam` or `adamw`",
        "momentum": "SGD's momentum",
        "weight_decay": "the optimizer's weight decay",
        "schedule": "`cosine` (decay to 0) or `constant`",
    },
    ClassifierRecipe: {
        "loss": "`ce` (cross-entropy) or `mse` (the NTK reference's squared loss on 2·onehot − 1)",
        "decay_to": "where weight decay pulls: `zero` (the optimizer's) or `start` (the PEFT scope's start values)",
    },
    SamplingDefaults: {
        "steps": "DDIM steps",
        "guidance": "classifier-free guidance scale s (1: none)",
    },
    DiffusionObjective: {
        "reduction": "the per-sample ε error `sum`med (the DDPM references) or averaged (`mean`, DiT) over C·H·W",
        "importance_guidance": "the guidance scale of the ε whose gradients give Fishers and saliency",
        "timesteps": "how each unlearning loss draws timesteps: `antithetic` (the DDPM references) or `uniform` (DiT)",
    },
}
def documented_fields(cls: type) -> dict[str, str]:
    """``{field: its line}`` of ``cls``, its base recipe's lines included."""
    lines: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        lines.update(FIELD_DOCS.get(base, {}))
    return lines


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        return "required" if item.default is None and item.name == "name" else f"`{item.default!r}`"
    if item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
        return "see below" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "required"


def render() -> str:
    """One markdown table per preset dataclass: every field with its type, default and meaning."""
    lines = []
    for cls in FIELD_DOCS:
        hints, docs = typing.get_type_hints(cls), documented_fields(cls)
        lines += [f"### `{cls.__name__}`", "", " ".join((cls.__doc__ or "").replace("``", "`").split()), "", "| field | type | default | meaning |",
                  "|---|---|---|---|"]
        for item in dataclasses.fields(cls):
            hint = hints[item.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            lines.append(f"| `{item.name}` | {kind.replace('|', 'or')} | {_default(item)} | {docs[item.name]} |")
        lines.append("")
    return "\n".join(lines).rstrip()
