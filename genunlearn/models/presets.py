"""Model presets: YAML files in ``genunlearn/configs/models/`` and ad-hoc timm models by name."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources

import timm
import yaml

from genunlearn.errors import UserError


@dataclass(frozen=True)
class TrainRecipe:
    """How a preset is trained from scratch (pretraining, and `retrain` on D_r)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"


@dataclass(frozen=True)
class ClassifierPreset:
    """Everything needed to build, train and load one classifier model."""

    name: str
    timm_name: str
    description: str = ""
    kind: str = "classifier"
    model_args: dict = field(default_factory=dict)
    stem: str | None = None
    dataset: str = "digits"
    image_size: int = 8
    channels: int = 1
    train: TrainRecipe = field(default_factory=TrainRecipe)
    methods: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of what determines the pretrained weights (not the method defaults)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in ("description", "methods")}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: dict) -> "ClassifierPreset":
        raw = dict(raw)
        raw["train"] = TrainRecipe(**raw.get("train", {}))
        return cls(**raw)


def _preset_files() -> dict[str, str]:
    folder = resources.files("genunlearn") / "configs" / "models"
    return {p.name.removesuffix(".yaml"): p.read_text() for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {name: yaml.safe_load(text).get("description", "") for name, text in sorted(_preset_files().items())}


def get_preset(name: str) -> ClassifierPreset:
    """The preset called ``name``, or an ad-hoc preset for a timm model name (trained on the digits recipe)."""
    files = _preset_files()
    if name in files:
        return ClassifierPreset.from_dict(yaml.safe_load(files[name]))
    timm_name = name.removeprefix("timm/")
    if timm.is_model(timm_name):
        return ClassifierPreset(name=name, timm_name=timm_name, description=f"timm {timm_name}")
    raise UserError(f"unknown model {name!r}; choose a preset ({', '.join(sorted(files))}) or a timm model name")
