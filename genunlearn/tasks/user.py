"""Tasks from what the user holds: any image classifier with its datasets, any class-conditional diffusers denoiser
or pipeline with its data or its own samples. No preset needed: the method defaults are the references'."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

from diffusers import DDPMScheduler, DiffusionPipeline
from torch import nn
from torch.utils.data import Dataset

from genunlearn.data.adapt import as_labeled_dataset
from genunlearn.errors import UserError
from genunlearn.models.held import denoiser_kind, family_defaults
from genunlearn.models.presets import ClassifierPreset, ClassifierRecipe, DiffusionPreset
from genunlearn.tasks.classifier import ClassifierTask
from genunlearn.tasks.diffusion import DiffusionTask


def classifier_task(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    *,
    classes: Sequence[str] | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    recipe: ClassifierRecipe | None = None,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> ClassifierTask:
    """A task over ``model`` (images ``[B, C, H, W]`` -> logits ``[B, K]``, timm or not) trained on ``train``.

    ``train``/``test``: map-style ``(image, label)`` datasets (torchvision ``ImageFolder``/``CIFAR10``, ``TensorDataset``,
    a Hugging Face ``datasets.Dataset``; see ``as_labeled_dataset``), images as ``model`` takes them. ``classes``: the
    class names when the data does not carry them. ``retrain`` trains ``model_factory()`` with ``recipe`` (default: a
    copy of ``model`` with every layer's ``reset_parameters()`` and SGD 0.05, 30 epochs, cosine). ``cache_dir``: where
    Fishers and masks are kept between runs (None: recomputed)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"the model must be a torch nn.Module mapping images to logits, got {type(model).__name__}")
    train = as_labeled_dataset(train, classes)
    test = as_labeled_dataset(test, train.classes)
    if len(train) == 0:
        raise UserError("the training set is empty; pass the data the model was trained on")
    image = train[0][0]
    preset = ClassifierPreset(name=name or type(model).__name__, timm_name=_timm_architecture(model), description="a user's model",
                              dataset="user", image_size=int(image.shape[-1]), channels=int(image.shape[0]),
                              train=recipe or ClassifierRecipe())
    return ClassifierTask(preset, model.eval(), train, test, cache_dir=None if cache_dir is None else Path(cache_dir),
                          model_factory=model_factory or (lambda: reinitialised_copy(model)))


def reinitialised_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with ``reset_parameters()`` called on every layer that has one (PyTorch's default
    initialisation; a library's own scheme, such as timm's zero-initialised residual norms, needs a factory)."""
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh.train()


def _timm_architecture(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")


def diffusion_task(
    model: nn.Module | DiffusionPipeline | str | Path,
    train: Dataset,
    test: Dataset | None = None,
    *,
    scheduler: DDPMScheduler | None = None,
    vae: nn.Module | None = None,
    classes: Sequence[str] | None = None,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> DiffusionTask:
    """A task over a class-conditional denoiser: a diffusers ``UNet2DModel`` with class embeddings (the last one the
    null class of guidance) or ``DiTTransformer2DModel`` with its training ``scheduler`` (and ``vae`` for a latent
    model), or a ``DiTPipeline`` / genunlearn pipeline object or folder that holds them.

    ``train``/``test``: images in [-1, 1] with their class labels (as ``classifier_task`` reads data; ``test``
    defaults to ``train``), or a model's own samples from ``sample_dataset`` (data-free forgetting). The losses and
    method defaults are those of the reference for the architecture (``models.held.family_defaults``, as on the command
    line); pass settings to
    ``unlearn`` to change them."""
    from genunlearn.storage.pipeline_folder import load_pipeline  # it imports models that build tasks: imported on use
    from genunlearn.models.pipeline import pipeline_denoiser

    id2label = None
    if isinstance(model, (str, Path)):
        model = load_pipeline(model)
    if isinstance(model, DiffusionPipeline):
        scheduler, vae, id2label = model.scheduler, model.vae, model.config.get("id2label")
        model = pipeline_denoiser(model)
    architecture, num_classes = denoiser_kind(model)
    if scheduler is None:
        raise UserError("pass scheduler= (the noise scheduler the denoiser was trained with, e.g. DDPMScheduler(...))")
    encoded = bool(getattr(train, "latents", False))
    train = as_labeled_dataset(train, classes)
    test = as_labeled_dataset(test, train.classes) if test is not None else train
    if len(train.classes) != num_classes:
        raise UserError(f"the denoiser has {num_classes} classes but the data has {len(train.classes)}; pass classes= with "
                        f"{num_classes} names")
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k not in ("num_class_embeds", "num_embeds_ada_norm")}
    preset = DiffusionPreset.from_dict({
        **family_defaults("diffusion", architecture), "name": name or type(model).__name__, "description": "a user's model",
        "architecture": architecture, "model_args": config, "dataset": "user", "eval_classifier": "",
        "image_size": int(train[0][0].shape[-1]), "channels": int(train[0][0].shape[0]),
        "num_train_timesteps": scheduler.config.num_train_timesteps, "beta_schedule": scheduler.config.beta_schedule,
    })
    return DiffusionTask(preset, model.eval(), DDPMScheduler.from_config(scheduler.config), train, test, vae=vae,
                         cache_dir=None if cache_dir is None else Path(cache_dir), encoded_data=encoded, id2label=id2label)


def sample_dataset(
    model: nn.Module | DiffusionPipeline,
    classes: Sequence[int],
    per_class: int = 100,
    *,
    scheduler: DDPMScheduler | None = None,
    vae: nn.Module | None = None,
    guidance: float = 1.0,
    steps: int = 50,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    accelerator=None,
) -> tuple[Dataset, Dataset]:
    """``(train, test)``: the model's own DDIM samples of ``classes``, ``per_class`` each and a quarter as many for
    test; the data of data-free forgetting (pass them to ``diffusion_task``). A latent model's samples stay latents
    (``.latents`` is True), as the references replay them; ``.generated`` marks the sets as the model's own samples. ``model``: a pipeline, or a denoiser with its ``scheduler``
    (and ``vae``)."""
    from genunlearn.data.generated import generated_datasets
    from genunlearn.distributed import make_accelerator
    from genunlearn.models.sampling import pipeline_for
    from genunlearn.models.pipeline import make_pipeline, pipeline_class_names

    if not isinstance(model, DiffusionPipeline):
        _, num_classes = denoiser_kind(model)
        if scheduler is None:
            raise UserError("pass scheduler= (the noise scheduler the denoiser was trained with) to sample a bare denoiser")
        model = make_pipeline(model, scheduler, vae, num_classes)
    if per_class < 2 or not classes:
        raise UserError("sample at least 2 images per class of at least one class")
    latents = model.vae is not None
    train, test = generated_datasets(pipeline_for(model), pipeline_class_names(model), sorted(set(classes)), per_class,
                                     accelerator or make_accelerator(), guidance=guidance, steps=steps, seed=seed,
                                     cache_dir=None if cache_dir is None else Path(cache_dir), latents=latents)
    for dataset in (train, test):
        dataset.latents, dataset.generated = latents, True
    return train, test
