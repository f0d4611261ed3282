"""Loading a preset's data and a classifier with its weights (given, downloaded, cached or pretrained now)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from genunlearn.data.digits import load_digits_split
from genunlearn.data.folders import default_transform, image_folder_splits
from genunlearn.data.tensor_dataset import LabeledDataset
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.precision import numerics_tag
from genunlearn.storage.cache import PRETRAIN_SEED, cache_root, cached_or_built, pretrained_entry
from genunlearn.models.presets import ClassifierPreset, Preset, get_preset
from genunlearn.storage.files import WEIGHTS_NAME, load_weights, save_model_dir
from genunlearn.tasks.classifier import ClassifierTask, build_classifier
from genunlearn.engine.training import TrainConfig, train_from_scratch



EMBEDDED_DATASETS = ("digits",)


def load_datasets(preset: Preset, data_dir: str | Path | None,
                  cache_dir: str | Path | None = None) -> tuple[LabeledDataset, LabeledDataset, str]:
    """``(train, test, data_id)``: the embedded digits, or ``data_dir``'s image folders at the preset's size (their
    content hashes remembered in ``cache_dir``'s cache)."""
    if data_dir is not None:
        mean, std = preset.normalisation() if isinstance(preset, ClassifierPreset) else (None, None)
        train, test = image_folder_splits(data_dir, default_transform(preset.image_size, preset.channels, mean, std), cache_dir)
        return train, test, f"folder-{train.fingerprint()}"
    if preset.dataset not in EMBEDDED_DATASETS:
        trained_on = "a user's data" if preset.dataset == "user" else preset.dataset
        raise UserError(f"model {preset.name} is trained on {trained_on}, which is not embedded; pass --data DIR (an image "
                        "folder ROOT/{train,test}/<class>/)")
    train, test = load_digits_split(preset.image_size)
    return train, test, f"digits{preset.image_size}"


def load_classifier_task(
    model: str | ClassifierPreset,
    *,
    pretrained: str | None = None,
    data: str | Path | None = None,
    cache_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
) -> ClassifierTask:
    """The classifier task of ``model`` (a classifier preset, its name or a timm name) with its data and weights
    (see ``load_network``)."""
    preset = get_preset(model) if isinstance(model, str) else model
    if not isinstance(preset, ClassifierPreset):
        raise UserError(f"{preset.name} is a {preset.kind} model; a classifier is needed here")
    train, test, data_id = load_datasets(preset, data, cache_dir)
    network = load_network(preset, train, data_id, pretrained=pretrained, cache_dir=cache_dir, accelerator=accelerator)
    return ClassifierTask(preset, network, train, test, cache_dir=cache_root(cache_dir))


def load_network(
    preset: ClassifierPreset,
    train: LabeledDataset,
    data_id: str,
    *,
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
):
    """The preset's network in eval mode. Weights: ``pretrained`` as a local weights file or model folder, or an
    ``hf-hub:`` id; without it, the preset's own (``hub_id``: a timm folder or hub id), else the cached locally
    pretrained weights, pretrained now (with a progress bar) on first use."""
    num_classes = len(train.classes)
    if pretrained is None and preset.hub_id is not None:
        network = build_classifier(preset, num_classes, pretrained_id=preset.hub_id)
    elif pretrained is None:
        network = _cached_or_pretrained(preset, train, data_id, cache_root(cache_dir), accelerator or make_accelerator())
    elif pretrained.startswith("hf-hub:"):
        network = build_classifier(preset, num_classes, pretrained_id=pretrained)
    else:
        network = build_classifier(preset, num_classes)
        load_weights(network, Path(pretrained))
    return network.eval()


def _cached_or_pretrained(
    preset: ClassifierPreset, train: LabeledDataset, data_id: str, root: Path, accelerator: Accelerator
):
    entry = pretrained_entry(root, preset, data_id, PRETRAIN_SEED, numerics_tag(accelerator))
    network = build_classifier(preset, len(train.classes))

    def pretrain_and_save() -> None:
        task = ClassifierTask(preset, network, train, train)
        cfg = TrainConfig.from_recipe(preset.train, seed=PRETRAIN_SEED, log_every=50)
        trained = train_from_scratch(task, train, cfg, accelerator, desc=f"pretraining {preset.name}").model
        if accelerator.is_main_process:
            save_model_dir(trained, {"preset": preset.to_dict(), "data": data_id, "classes": train.classes}, entry)

    def load(folder: Path):
        load_weights(network, folder / WEIGHTS_NAME)
        return network

    return cached_or_built(entry, WEIGHTS_NAME, pretrain_and_save, load, accelerator, f"{preset.name} on {data_id}")
