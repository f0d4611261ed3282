"""Model presets: YAML files in ``genunlearn/configs/models/`` and ad-hoc timm models by name."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path

import yaml

from genunlearn.errors import UserError
from genunlearn.models.held import folder_preset, timm_name_preset, with_family_defaults


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
class ClassifierRecipe(TrainRecipe):
    """A classifier's recipe adds the loss it is trained on, ``ce`` or ``mse`` (½‖f − (2·onehot − 1)‖² per sample,
    the NTK reference's squared loss), and where weight decay pulls, ``zero`` (the optimizer's) or ``start``
    (the PEFT scope's start values, as the reference's L2 penalty toward the initialisation)."""

    loss: str = "ce"
    decay_to: str = "zero"

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "mse") or self.decay_to not in ("zero", "start"):
            raise UserError(f"train.loss must be ce or mse and train.decay_to zero or start, got {self.loss!r}, {self.decay_to!r}")


@dataclass(frozen=True)
class ClassifierPreset:
    """Everything needed to build, train and load one classifier model."""

    name: str
    timm_name: str
    description: str = ""
    kind: str = "classifier"
    model_args: dict = field(default_factory=dict)
    stem: str | None = None
    peft: str | None = None
    hub_id: str | None = None
    dataset: str = "digits"
    image_size: int = 8
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    train: ClassifierRecipe = field(default_factory=ClassifierRecipe)
    methods: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train.decay_to == "start" and self.peft is None:
            raise UserError(f"preset {self.name}: train.decay_to start needs a PEFT scope (peft: batchnorm+head, ...)")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, self.channels):
                raise UserError(f"preset {self.name}: {key} needs one value or one per channel ({self.channels}), "
                                f"got {getattr(self, key)}")
        if min(self.std) <= 0:
            raise UserError(f"preset {self.name}: std must be positive, got {self.std}")

    def normalisation(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` per channel on [0, 1] pixels (the default 0.5, 0.5 scales them to [-1, 1])."""
        return tuple(list(v) * self.channels if len(v) == 1 else list(v) for v in (self.mean, self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of what determines the pretrained weights (not the method defaults)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in ("description", "methods", "hub_id")}
        # fields added later are left out at their defaults, so older presets keep their cache keys
        if self.peft is None:
            del relevant["peft"]
        else:  # PEFT presets train with frozen BatchNorm statistics since these were added
            relevant["batchnorm_statistics"] = "frozen"
        for key in ("mean", "std"):
            if relevant[key] == [0.5]:
                del relevant[key]
        for key, default in (("loss", "ce"), ("decay_to", "zero")):
            if relevant["train"][key] == default:
                del relevant["train"][key]
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: dict) -> "ClassifierPreset":
        raw = dict(raw)
        raw["train"] = ClassifierRecipe(**raw.get("train", {}))
        return cls(**raw)


@dataclass(frozen=True)
class SamplingDefaults:
    """How a diffusion preset samples by default: DDIM ``steps`` and guidance scale ``guidance`` (1 = no CFG)."""

    steps: int = 50
    guidance: float = 1.0


@dataclass(frozen=True)
class DiffusionObjective:
    """How unlearning computes a diffusion preset's losses, as its reference code does (defaults: the DDPM
    references, SalUn's and SFR-on's ``runners/diffusion.py``).

    ``reduction``: the per-sample ε error is summed (``sum``, the DDPM references) or averaged (``mean``, DiT's
    ``mean_flat``) over C·H·W; gradient clips and SalUn's β are defined against it. ``importance_guidance``: the CFG
    scale s of the ε whose gradients give Fishers and saliency (the DDPM references' w = 2 is s = 3; SFR-on's DiT
    Fisher is unguided, s = 1); ``timesteps``: how every unlearning loss (steps, Fishers, saliency) draws a batch's
    timesteps: ``antithetic`` (the DDPM references: the first half uniform, the second half T-1-t of the first, one
    per sample) or ``uniform`` (DiT)."""

    reduction: str = "sum"
    importance_guidance: float = 3.0
    timesteps: str = "antithetic"

    def __post_init__(self) -> None:
        if self.reduction not in ("sum", "mean") or self.timesteps not in ("antithetic", "uniform"):
            raise UserError(
                f"objective.reduction must be sum or mean and objective.timesteps antithetic or uniform, "
                f"got {self.reduction!r}, {self.timesteps!r}"
            )
        if self.importance_guidance < 0:
            raise UserError(f"objective.importance_guidance must be non-negative, got {self.importance_guidance}")


@dataclass(frozen=True)
class DiffusionPreset:
    """A class-conditional diffusion model: a diffusers ``UNet2DModel`` (``architecture: unet``) or
    ``DiTTransformer2DModel`` (``dit``) built from ``model_args``, its noise schedule, data and recipes.

    ``hub_id``: a Hugging Face pipeline to start from instead of pretraining locally; ``remain_classes``: how
    many of the other classes (chosen by seed) stand for the retain set in data-free runs and evaluation
    (None: all of them; 1000-class models cannot sample every class on each run)."""

    name: str
    architecture: str
    description: str = ""
    kind: str = "diffusion"
    model_args: dict = field(default_factory=dict)
    hub_id: str | None = None
    remain_classes: int | None = None
    dataset: str = "digits"
    image_size: int = 8
    channels: int = 1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    class_dropout: float = 0.1
    eval_classifier: str = "cnn-digits"
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    objective: DiffusionObjective = field(default_factory=DiffusionObjective)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    methods: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of what determines the pretrained weights (not how they are sampled, judged or unlearned)."""
        ignored = ("description", "methods", "hub_id", "remain_classes", "sampling", "objective", "eval_classifier")
        relevant = {k: v for k, v in self.to_dict().items() if k not in ignored}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: dict) -> "DiffusionPreset":
        raw = dict(raw)
        raw["train"] = TrainRecipe(**raw.get("train", {}))
        raw["sampling"] = SamplingDefaults(**raw.get("sampling", {}))
        raw["objective"] = DiffusionObjective(**raw.get("objective", {}))
        return cls(**raw)


@dataclass(frozen=True)
class TextToImagePreset:
    """A text-to-image model: a ``StableDiffusionPipeline`` from ``hub_id`` (or ``--pretrained``), or the tiny offline
    one of ``family`` (``sd``, ``sdxl``, ``sd3``) that ``models.tiny_sd``/``tiny_sd3`` build from ``model_args`` (the
    components' arguments; ``max_length`` tokens per prompt) and pretrains on ``dataset`` (the VAE with ``vae_train``, then the UNet with ``train``, and the
    text encoder with it when ``train_text_encoder``, latent diffusion's text-to-image recipe); its sampling and
    method defaults, and the prompts a concept erasure retains by default (``retain_prompts``; those naming an erased
    concept's class are left out)."""

    name: str
    description: str = ""
    kind: str = "text-to-image"
    family: str = "sd"
    model_args: dict = field(default_factory=dict)
    hub_id: str | None = None
    dataset: str = "captioned-digits"
    image_size: int = 8
    channels: int = 1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    eval_classifier: str = "cnn-digits"
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    vae_train: TrainRecipe = field(default_factory=TrainRecipe)
    train_text_encoder: bool = False
    methods: dict = field(default_factory=dict)
    retain_prompts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of what determines the pretrained weights (not how they are sampled, judged or unlearned)."""
        ignored = ("description", "methods", "hub_id", "sampling", "eval_classifier", "retain_prompts")
        relevant = {k: v for k, v in self.to_dict().items() if k not in ignored}
        if relevant["family"] == "sd":  # the family every preset had before the field: their pretrainings stay cached
            del relevant["family"]
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: dict) -> "TextToImagePreset":
        raw = dict(raw)
        raw["train"] = TrainRecipe(**raw.get("train", {}))
        raw["vae_train"] = TrainRecipe(**raw.get("vae_train", {}))
        raw["sampling"] = SamplingDefaults(**raw.get("sampling", {}))
        return cls(**raw)


Preset = ClassifierPreset | DiffusionPreset | TextToImagePreset
PRESET_CLASSES = {"classifier": ClassifierPreset, "diffusion": DiffusionPreset, "text-to-image": TextToImagePreset}


def _preset_files() -> dict[str, str]:
    folder = resources.files("genunlearn") / "configs" / "models"
    return {p.name.removesuffix(".yaml"): p.read_text() for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {name: yaml.safe_load(text).get("description", "") for name, text in sorted(_preset_files().items())}


SCALARS = (int, float, str, bool, type(None))
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _fits(value, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed) or isinstance(value, int) and float in allowed


def _check_types(record, source: str) -> None:
    """A UserError unless every scalar field of ``record`` (and of the records in it) holds its type."""
    hints = typing.get_type_hints(type(record))
    for item in fields(record):
        hint, value = hints[item.name], getattr(record, item.name)
        if typing.get_origin(hint) is list:  # a list of scalars: each item holds the item type
            if not isinstance(value, list) or not all(_fits(v, typing.get_args(hint)) for v in value):
                raise UserError(f"{source}: {item.name} must be a list of {typing.get_args(hint)[0].__name__}, got {value!r}; "
                                "compare it with genunlearn/configs/models/*.yaml")
            continue
        allowed = typing.get_args(hint) or (hint,)
        if is_dataclass(value):
            _check_types(value, source)
        elif all(kind in SCALARS for kind in allowed) and not _fits(value, allowed):
            wanted = " or ".join(kind.__name__ for kind in allowed if kind is not type(None))
            raise UserError(f"{source}: {item.name} must be {wanted}, got {value!r}; compare it with genunlearn/configs/models/*.yaml")


def _preset_from_text(text: str, source: str) -> Preset:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        raise UserError(f"{source} is not valid YAML{f' (line {where.line + 1})' if where else ''}; fix it or compare it with "
                        "genunlearn/configs/models/*.yaml") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source} is not a preset (a YAML mapping of settings); compare it with genunlearn/configs/models/*.yaml")
    try:
        preset = PRESET_CLASSES.get(raw.get("kind"), ClassifierPreset).from_dict(with_family_defaults(raw))
    except (TypeError, AttributeError) as exc:
        raise UserError(f"{source} is not a valid preset ({exc}); compare it with genunlearn/configs/models/*.yaml") from None
    _check_types(preset, source)
    if not PRESET_NAME.fullmatch(preset.name):
        raise UserError(f"{source}: name {preset.name!r} must be letters, digits, '.', '_' or '-' (it names cache folders); "
                        "rename it, e.g. my-model")
    return preset


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a preset YAML file at the path ``name`` (e.g. a built-in preset with its
    architecture changed); a model folder as users hold it (a diffusers model or pipeline folder, a timm folder; see
    ``models.held``); or a bare timm model name (timm's own input size and normalisation, trained on ``--data``)."""
    files = _preset_files()
    if name in files:
        return _preset_from_text(files[name], name)
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"preset file {name} does not exist; pass a preset name (genunlearn models) or a YAML file")
        return _preset_from_text(path.read_text(), name)
    if Path(name).is_dir():
        raw = folder_preset(Path(name))
        return PRESET_CLASSES[raw["kind"]].from_dict(raw)
    if name.startswith("hf-hub:"):  # its preprocessing is in the repo's config.json, which a hub folder holds offline
        raise UserError(f"{name} is a Hub repo; download it (`hf download {name.removeprefix('hf-hub:')} --local-dir DIR`) and "
                        "pass --pretrained DIR, a timm folder read offline, or pass --model ARCH --pretrained " + name)
    import timm  # imported on use: it takes a second

    timm_name = name.removeprefix("timm/")
    if timm.is_model(timm_name):
        return ClassifierPreset.from_dict(timm_name_preset(name, timm_name))
    raise UserError(f"unknown model {name!r}; choose a preset ({', '.join(sorted(files))}), a preset YAML file, a model "
                    "folder (diffusers or timm) or a timm model name")
