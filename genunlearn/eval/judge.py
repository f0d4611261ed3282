"""The classifier that judges generated samples: a genunlearn classifier preset trained on the real data, or a
timm ImageNet model (hub weights, or a local weights file) behind its own resizing and normalisation."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from genunlearn.errors import UserError
from genunlearn.models.held import is_timm_folder
from genunlearn.models.loading import load_classifier_task
from genunlearn.models.presets import ClassifierPreset, get_preset, list_presets
from genunlearn.storage.files import load_weights
from genunlearn.tasks.classifier import build_classifier

class PreparedClassifier(nn.Module):
    """A timm classifier for images ``[B, C, H, W]`` in [-1, 1] of any size: resized (bilinear, antialiased) to its
    input size and normalised with its mean/std, with ``forward_features``/``forward_head``/``num_features``/``num_classes``
    passed through, so FID features and class metrics treat it like any timm model."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_size = tuple(input_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.num_features = int(model.num_features)
        self.num_classes = int(model.num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1.0) / 2.0
        channels = self.mean.shape[1]
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)  # grey samples to an RGB judge
        elif x.shape[1] == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)  # ITU-R 601 luma
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.prepare(images))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))


def is_preset_classifier(name: str) -> bool:
    return name in list_presets() or name.endswith((".yaml", ".yml"))


def load_eval_classifier(
    name: str,
    *,
    weights: str | None,
    num_classes: int,
    data: str | None,
    cache_dir: str | None,
    accelerator: Accelerator,
) -> nn.Module:
    """The judge in eval mode. A classifier preset (``cnn-digits``): ``weights`` if given, else trained on the real
    data on first use and cached. A timm name or ``hf-hub:`` id: ``weights`` (a .safetensors/.pt file or a folder
    holding model.safetensors) if given, else the hub's pretrained weights (needs network). A timm folder
    (``config.json`` with ``architecture``, e.g. written by ``save_classifier``): its weights, input size and mean/std."""
    if Path(name).is_dir():
        model = load_timm_folder(Path(name))
    elif is_preset_classifier(name):
        preset = get_preset(name)
        if not isinstance(preset, ClassifierPreset):
            raise UserError(f"--eval-classifier {name} is not a classifier; name a classifier preset or a timm model")
        if weights is None:
            model = load_classifier_task(preset, data=data, cache_dir=cache_dir, accelerator=accelerator).model
        else:
            model = _with_weights(build_classifier(preset, num_classes), weights)
    else:
        model = load_timm_classifier(name, weights, num_classes)
    if model.num_classes != num_classes:
        raise UserError(f"the evaluation classifier {name} has {model.num_classes} classes, the diffusion model {num_classes}; "
                        "pass --eval-classifier trained on the same classes")
    return model.eval()


def _with_weights(model: nn.Module, weights: str) -> nn.Module:
    load_weights(model, Path(weights))
    return model


def load_timm_folder(folder: Path) -> PreparedClassifier:
    """A timm folder's classifier behind its own preprocessing (``pretrained_cfg``: input size, mean/std)."""
    if not is_timm_folder(folder):
        raise UserError(f"--eval-classifier {folder} is not a timm folder (config.json with architecture); write it with "
                        "genunlearn.save_classifier or timm.models.save_for_hf")
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"could not load the timm folder {folder} ({str(exc).splitlines()[0][:200]}); re-save it with "
                        "genunlearn.save_classifier") from None
    return prepared(model)


def load_timm_classifier(name: str, weights: str | None, num_classes: int = 1000) -> PreparedClassifier:
    """A timm model (name or ``hf-hub:`` id) with ``weights`` (a local file or folder) or its hub weights."""
    timm_name = name.removeprefix("timm/") if not name.startswith("hf-hub:") else name
    try:
        if weights is None:
            model = timm.create_model(timm_name, pretrained=True)
        else:
            model = _with_weights(timm.create_model(timm_name, pretrained=False, num_classes=num_classes), weights)
    except (OSError, HfHubHTTPError) as exc:
        raise UserError(
            f"could not fetch the weights of {name} ({type(exc).__name__}: no network?); download them where there is "
            "a network and pass --eval-classifier-weights /path/to/model.safetensors"
        ) from None
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"unknown evaluation classifier {name!r}; name a classifier preset or a timm model") from None
        raise
    return prepared(model)


def prepared(model: nn.Module) -> PreparedClassifier:
    """``model`` behind the preprocessing timm resolves for it (its ``pretrained_cfg``: input size, mean/std)."""
    config = timm.data.resolve_model_data_config(model)
    return PreparedClassifier(model, config["input_size"][1:], config["mean"], config["std"])
