"""Model kinds behind one adapter each (``base.Kind``): ``kind_of`` is the one place a preset's kind is decided, so a
new kind is one adapter class added to ``KINDS``."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.kinds.base import Kind
from genunlearn.kinds.classifier import ClassifierKind
from genunlearn.kinds.diffusion import DiffusionKind
from genunlearn.kinds.text_to_image import TextToImageKind
from genunlearn.models.presets import Preset, get_preset
from genunlearn.progress import library_console
from genunlearn.storage.cache import writable_cache_root
from genunlearn.tasks.base import Task

KINDS: dict[str, Kind] = {kind.name: kind for kind in (ClassifierKind(), DiffusionKind(), TextToImageKind())}


def kind_of(preset: Preset) -> Kind:
    """The adapter of ``preset``'s kind (its YAML ``kind:``)."""
    if preset.kind not in KINDS:
        raise UserError(f"{preset.name} has kind {preset.kind!r}; genunlearn knows {', '.join(sorted(KINDS))}")
    return KINDS[preset.kind]


def load_task(
    model: str,
    *,
    pretrained: str | None = None,
    data: str | Path | None = None,
    cache_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
) -> Task:
    """The task of ``model`` (a preset, a preset YAML file or a timm name) with its data (``data``: an image-folder
    root, else the preset's embedded data) and weights: ``pretrained`` (a weights file, model or pipeline folder, or
    hub id), else cached, else pretrained now (with a progress bar) and cached."""
    preset = get_preset(model)
    writable_cache_root(cache_dir)
    library_console()  # pretraining's progress in a notebook or a log file too
    return kind_of(preset).load_task(preset, pretrained=pretrained, data=data, cache_dir=cache_dir,
                                     accelerator=accelerator or make_accelerator())
