"""A classifier's folder in timm's hub layout, so ``timm.create_model("local-dir:DIR")`` rebuilds it where timm can."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

import timm
from genunlearn.storage.files import CONFIG_NAME, make_staging_dir, publish_staging, save_model_dir

Loadable = Literal["timm", "timm-after-import", "state-dict"]
PROBE_SEED = 0


def save_classifier(
    model: nn.Module,
    directory: str | Path,
    classes: list[str],
    *,
    input_size: tuple[int, int, int] | None = None,
    normalisation: tuple | None = None,
    data: Dataset | None = None,
    metadata: dict | None = None,
) -> Loadable:
    """Write ``model`` into ``directory`` (atomically): ``model.safetensors`` and ``config.json``.

    A model timm built (and left as timm builds it) gets timm's hub layout, written by ``timm.models.save_for_hf``
    with ``classes`` as ``label_names``, ``input_size`` ``(C, H, W)`` and ``normalisation`` ``(mean, std)`` (on
    [0, 1] pixels; each a number or one per channel) as its preprocessing, and ``metadata`` under the ``genunlearn``
    key; it is kept only if ``timm.create_model("local-dir:...")`` then gives bit-identical logits. Either
    preprocessing value left out is read from ``data`` (the model's dataset: the size of an item, the ``Normalize``
    of its torchvision transform); a ``ValueError`` names the argument when neither says it, since timm's loaders
    would otherwise apply its ImageNet defaults. Returns how the folder loads: ``timm``; ``timm-after-import`` (an
    architecture genunlearn registers with timm, e.g. ``genunlearn_cnn``: ``import genunlearn.models.cnn`` first); or
    ``state-dict`` (timm cannot rebuild it from arguments, e.g. a replaced stem, or a model timm did not build):
    ``config.json`` then holds ``label_names`` and ``metadata`` only."""
    directory = Path(directory)
    if hasattr(model, "pretrained_cfg"):
        input_size, normalisation = _preprocessing(input_size, normalisation, data)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory.parent, directory.name)
    loadable = _write_timm_layout(model, staging, classes, input_size, normalisation, metadata or {})
    if loadable == "state-dict":
        shutil.rmtree(staging)
        save_model_dir(model, {"label_names": list(classes), "genunlearn": {**(metadata or {}), "loadable": loadable}}, directory)
    else:
        publish_staging(staging, directory)
    return loadable


def _preprocessing(input_size, normalisation, data: Dataset | None) -> tuple[tuple[int, int, int], tuple]:
    """``(input_size, (mean, std))``, each as given, else read from ``data``; a ValueError naming what is missing."""
    if input_size is None and data is not None:
        input_size = tuple(int(n) for n in data[0][0].shape)
    if normalisation is None and data is not None:
        normalisation = _normalize_of(getattr(data, "transform", None))
    missing = [name for name, value in (("input_size", input_size), ("normalisation", normalisation)) if value is None]
    if missing:
        raise ValueError(f"save_classifier: pass {' and '.join(missing)} (e.g. input_size=(3, 32, 32), normalisation=(mean, "
                         "std) on [0, 1] pixels) or data= with a torchvision Normalize transform; else timm's loaders "
                         "would apply ImageNet's size and mean/std to this model")
    return tuple(input_size), tuple(normalisation)


def _normalize_of(transform) -> tuple | None:
    """``(mean, std)`` of the torchvision ``Normalize`` in ``transform`` (a ``Compose`` or the transform itself)."""
    steps = getattr(transform, "transforms", [transform])
    found = [step for step in steps if isinstance(step, T.Normalize)]
    return (tuple(found[-1].mean), tuple(found[-1].std)) if found else None


def _write_timm_layout(model: nn.Module, folder: Path, classes: list[str], input_size, normalisation, metadata: dict) -> Loadable:
    if not hasattr(model, "pretrained_cfg"):
        return "state-dict"
    loadable: Loadable = "timm" if type(model).__module__.startswith("timm.") else "timm-after-import"
    data_config = {}
    if input_size is not None:
        data_config["input_size"] = tuple(input_size)
    if normalisation is not None:
        channels = (input_size or model.pretrained_cfg.get("input_size", (3,)))[0]
        mean, std = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * channels for v in normalisation)
        data_config.update(mean=mean, std=std, crop_pct=1.0)
    config = {"label_names": list(classes), "genunlearn": {**metadata, "loadable": loadable}}
    was_training, device = model.training, next(model.parameters()).device
    try:
        timm.models.save_for_hf(model.cpu().eval(), str(folder), model_config=config, safe_serialization=True,
                                data_config=data_config or None)
        return loadable if _reloads_exactly(model, folder) else "state-dict"
    except (ValueError, RuntimeError, KeyError, TypeError):  # arguments timm cannot serialise or rebuild from
        return "state-dict"
    finally:
        model.to(device).train(was_training)


def _reloads_exactly(model: nn.Module, folder: Path) -> bool:
    """Whether timm rebuilds ``folder`` into a model with ``model``'s logits on a fixed random batch."""
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = json.loads((folder / CONFIG_NAME).read_text())["pretrained_cfg"]["input_size"]
    probe = torch.randn(2, *size, generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad():
        return torch.equal(model(probe), reloaded(probe))
