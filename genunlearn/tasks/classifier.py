"""Image classification with timm models: per-sample cross-entropy, predictions, parameter scopes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import timm
from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.models import cnn as _register_cnn  # noqa: F401  (registers genunlearn_cnn with timm)
from genunlearn.models.peft import BACKBONE_SEED, prepare_peft, scope_initial_values, scope_parameters
from genunlearn.models.presets import ClassifierPreset
from genunlearn.tasks.base import Batch, ParameterScope
from genunlearn.errors import UserError


def build_classifier(preset: ClassifierPreset, num_classes: int, pretrained_id: str | None = None) -> nn.Module:
    """Create the preset's timm model with ``num_classes`` outputs; ``pretrained_id`` (``hf-hub:org/name``, downloaded,
    or ``local-dir:FOLDER``, a timm folder) gives its weights.
    A preset with ``peft: SCOPE`` gets the fixed random backbone, frozen, with only SCOPE trainable."""
    name = pretrained_id or preset.timm_name
    with torch.random.fork_rng(enabled=preset.peft is not None):
        if preset.peft is not None:
            torch.manual_seed(BACKBONE_SEED)  # a PEFT backbone is the same random initialisation every time
        try:
            model = timm.create_model(
                name, pretrained=pretrained_id is not None, num_classes=num_classes, in_chans=preset.channels, **preset.model_args
            )
        except (OSError, RuntimeError) as exc:
            if name.startswith("local-dir:"):
                raise UserError(f"could not load the timm folder {name.removeprefix('local-dir:')} with {num_classes} classes "
                                f"({str(exc).splitlines()[0][:200]}); pass --data with the classes it was trained on") from None
            raise UserError(
                f"could not fetch {pretrained_id} ({type(exc).__name__}: no network?); download its weights where there is a"
                " network and pass --pretrained /path/to/model.safetensors"
            ) from None
        if preset.stem == "cifar":
            _use_small_image_stem(model, preset.channels)
    return model if preset.peft is None else prepare_peft(model, preset.peft)


# The same stem in the line a model card gives for rebuilding it with timm and torch alone (``m``: the timm ResNet).
SMALL_STEM_REBUILD = "m.conv1 = torch.nn.Conv2d({channels}, 64, 3, stride=1, padding=1, bias=False); m.maxpool = torch.nn.Identity()"


def _use_small_image_stem(model: nn.Module, channels: int) -> None:
    """3x3 stride-1 first conv and no max-pool (the CIFAR ResNet stem), so 8-32 px inputs keep their resolution.
    timm has no argument for it, so such a model's folder is a state dict (see ``SMALL_STEM_REBUILD``)."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise UserError(f"stem: cifar applies to timm ResNets only, not {type(model).__name__}")
    model.conv1 = nn.Conv2d(channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


class ClassifierTask:
    """A classifier, the preset that built it, the data it was trained on, and where its derived
    artefacts (Fishers, masks) are cached (None: not cached); ``model_factory`` builds the untrained network ``retrain``
    starts from (default: the preset's timm model). A PEFT preset's model trains with ``frozen_batchnorm``:
    the backbone's BatchNorm running statistics are part of the frozen backbone (the NTK reference's ``--disable-bn``),
    so they never absorb D_f and the trained function is the eval-mode one that Fast-NTK linearises."""

    def __init__(
        self,
        preset: ClassifierPreset,
        model: nn.Module,
        train_data: LabeledDataset,
        test_data: LabeledDataset,
        cache_dir: Path | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.preset = preset
        self.model_factory = model_factory or (lambda: build_classifier(preset, self.num_classes))
        self.cache_dir = cache_dir
        self.name = preset.name
        self.model = model
        self.train_data = train_data
        self.test_data = test_data
        self.num_classes = len(train_data.classes)
        self.frozen_batchnorm = preset.peft is not None

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images -> ``[B, num_classes]`` logits."""
        return model(images)

    def loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample cross-entropy ``[B]`` (nats) against the batch's labels or ``labels``."""
        images, batch_labels = batch
        return F.cross_entropy(self.logits(model, images), batch_labels if labels is None else labels, reduction="none")

    importance_loss_id = "cross_entropy"

    def importance_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The loss whose gradients measure weight importance (Fishers, saliency): cross-entropy."""
        return self.loss(model, batch)

    def random_label_loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor, form: str = "eps_match") -> torch.Tensor:
        """``rl``'s per-sample loss: cross-entropy against ``labels`` (random other classes); ``form`` is the
        diffusion variant and has no classifier counterpart."""
        return self.loss(model, batch, labels=labels)

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample ``[B]`` loss the preset trains on: cross-entropy, or ``mse`` ½‖f − (2·onehot − 1)‖²; with
        ``decay_to: start`` plus (weight_decay / 2)·‖θ_scope − θ_start‖² (the same for every sample, so the batch
        mean carries it once)."""
        recipe = self.preset.train
        if recipe.loss == "ce":
            loss = self.loss(model, batch)
        else:
            images, labels = batch
            targets = 2 * F.one_hot(labels, self.num_classes).to(images.dtype) - 1
            loss = 0.5 * (self.logits(model, images) - targets).pow(2).sum(dim=1)
        if recipe.decay_to == "start":
            scope = scope_parameters(model, self.preset.peft)
            distance = sum((param - start).pow(2).sum() for (_, param), start in zip(scope, scope_initial_values(model, self.preset.peft)))
            loss = loss + 0.5 * recipe.weight_decay * distance
        return loss

    def fresh_model(self) -> nn.Module:
        return self.model_factory()

    def trainable_parameters(self, model: nn.Module, scope: ParameterScope = "all") -> list[tuple[str, nn.Parameter]]:
        """Named parameters of ``scope``: ``all``, ``batchnorm`` (affine), ``prompts``, ``head``, or a +-joined mix."""
        return scope_parameters(model, scope)
