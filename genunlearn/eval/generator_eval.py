"""Evaluating a class-conditional generator: sample every evaluated class under one protocol, judge the samples
with a classifier trained on real data, and measure FID per class and over the remaining classes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset

from genunlearn.errors import UserError
from genunlearn.eval.fid import (
    ClassifierFeatures,
    bootstrap_fid_std,
    InceptionFeatures,
    extract_features,
    fid_from_features,
    library_version,
)
from genunlearn.eval.classify import class_metrics
from genunlearn.eval.generative import classify_generated
from genunlearn.models.sampling import sample_classes
from genunlearn.models.pipeline import Pipeline
from genunlearn.tasks.diffusion import DiffusionTask

DECODE_BATCH = 32
DEFAULT_INCEPTION_WEIGHTS = Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class SamplingProtocol:
    """How evaluation samples: the same for the model before and after unlearning (DDIM, raw weights)."""

    per_class: int = 100
    guidance: float = 1.0
    steps: int = 50
    seed: int = 0
    sampler: str = "DDIM"


@dataclass
class FidSetup:
    """The feature extractor and Fréchet-distance library of one evaluation, and how to describe them."""

    extractor: nn.Module
    features: str
    library: str = "torchmetrics"

    def describe(self) -> dict:
        return {"fid_features": self.features, "fid_library": library_version(self.library)}


def fid_setup(choice: str, classifier: nn.Module, classifier_name: str, library: str, inception_weights: str | None,
              device: torch.device) -> FidSetup:
    """``choice``: ``classifier`` (the judge's pre-logit features, the offline default), ``inception`` (the FID
    Inception-v3 from ``inception_weights``, default torch's hub cache), or a timm model name (hub weights)."""
    if choice == "classifier":
        return FidSetup(ClassifierFeatures(classifier).to(device), f"{classifier_name} pre-logits", library)
    if choice == "inception":
        weights = inception_weights or DEFAULT_INCEPTION_WEIGHTS
        return FidSetup(InceptionFeatures(weights).to(device), f"Inception-v3 pool3 ({Path(weights).name})", library)
    from genunlearn.eval.judge import load_timm_classifier

    return FidSetup(ClassifierFeatures(load_timm_classifier(choice, None)).to(device), f"{choice} pre-logits", library)


def reference_images(task: DiffusionTask | None, retain: Dataset, classes: list[int]) -> dict[int, torch.Tensor]:
    """Per class, the FID reference ``[N_c, C, H, W]`` in [-1, 1]: the retain set's images of ``classes`` (decoded
    when ``task``'s sets hold latents; ``task`` None: images as they are)."""
    items = [retain[i] for i in range(len(retain))]
    reference = {}
    for class_id in classes:
        images = torch.stack([image for image, label in items if label == class_id])
        if task is not None and task.encoded_data:
            device = next(task.vae.parameters()).device
            images = torch.cat([task.decode(images[i : i + DECODE_BATCH].to(device)).cpu() for i in range(0, len(images), DECODE_BATCH)])
        reference[class_id] = images
    if any(len(images) < 2 for images in reference.values()):
        raise UserError("FID needs at least 2 reference images per remaining class; use more data or --data-free-samples")
    return reference


def reference_features(reference: dict[int, torch.Tensor], fid: FidSetup) -> dict[int, torch.Tensor]:
    return {class_id: extract_features(images, fid.extractor) for class_id, images in reference.items()}


def generator_metrics(
    pipeline: Pipeline, classifier: nn.Module, forgotten: list[int], remaining: list[int],
    reference: dict[int, torch.Tensor] | None, fid: FidSetup, protocol: SamplingProtocol, accelerator: Accelerator,
    heldout: list[int] = (), fid_draws: int = 0,
) -> tuple[dict, dict[int, torch.Tensor]]:
    """Metrics of ``pipeline``'s samples (fractions, nats, FID) and the samples themselves, per class.

    ``forget_acc``: fraction of forgotten-class samples the classifier still labels as that class;
    ``forget_entropy``/``forget_prob``: their mean softmax entropy and probability of the class (None without
    ``forgotten``); ``remain_acc``: the same accuracy over the ``remaining`` classes; ``fid_remain``: FID of their
    samples against ``reference`` (per-class reference features), all remaining classes pooled; ``fid_per_class``:
    each remaining class against its own reference (None and {} without ``reference``); ``per_class_acc``,
    ``per_class_prob``: every evaluated class. ``heldout``: other classes that unlearning never saw (a 1000-class
    model's classes outside its data-free D_r), scored apart as ``heldout_acc`` and ``fid_heldout`` (None without
    them) so collateral damage outside the replay set shows; their per-class figures join the per-class tables.
    ``fid_draws`` > 0 adds ``fid_remain_std``: ``fid_remain``'s spread over that many resamplings of the samples
    (its standard error at this sample size).
    """
    heldout = list(heldout)
    samples = sample_classes(pipeline, forgotten + remaining + heldout, protocol.per_class, accelerator,
                             guidance=protocol.guidance, steps=protocol.steps, seed=protocol.seed)
    per_class = class_metrics(classifier, samples, accelerator.device)

    def mean(key: str, classes) -> float | None:
        return sum(per_class[c][key] for c in classes) / len(classes) if classes else None

    metrics = {
        "forget_acc": mean("accuracy", forgotten),
        "forget_entropy": mean("entropy", forgotten),
        "forget_prob": mean("probability", forgotten),
        "remain_acc": mean("accuracy", remaining),
        "fid_remain": None,
        "heldout_acc": mean("accuracy", heldout),
        "fid_heldout": None,
        "fid_per_class": {},
        "per_class_acc": {str(c): per_class[c]["accuracy"] for c in sorted(per_class)},
        "per_class_prob": {str(c): per_class[c]["probability"] for c in sorted(per_class)},
    }
    if reference is not None:
        generated = {c: extract_features(samples[c], fid.extractor) for c in remaining + heldout}

        def pooled(features: dict[int, torch.Tensor], classes: list[int]) -> torch.Tensor:
            return torch.cat([features[c] for c in classes])

        remain_reference = pooled(reference, remaining)
        metrics["fid_remain"] = fid_from_features(remain_reference, pooled(generated, remaining), fid.library)
        if fid_draws:
            metrics["fid_remain_std"] = bootstrap_fid_std(remain_reference, [generated[c] for c in remaining], fid.library, fid_draws)
        if heldout:
            metrics["fid_heldout"] = fid_from_features(pooled(reference, heldout), pooled(generated, heldout), fid.library)
        metrics["fid_per_class"] = {str(c): fid_from_features(reference[c], generated[c], fid.library) for c in remaining + heldout}
    return metrics, samples


def forget_sample_accuracy(pipeline: Pipeline, classifier: nn.Module, forgotten: list[int], protocol: SamplingProtocol,
                           accelerator: Accelerator) -> float:
    """``forget_acc`` alone: the fraction of the forgotten classes' samples the classifier labels as their class."""
    per_class = classify_generated(pipeline, classifier, forgotten, protocol.per_class, accelerator,
                                   guidance=protocol.guidance, steps=protocol.steps, seed=protocol.seed)
    return sum(per_class[c]["accuracy"] for c in forgotten) / len(forgotten)


def protocol_record(protocol: SamplingProtocol, fid: FidSetup, classifier_name: str, classes: list[int],
                    reference: dict[int, torch.Tensor] | None, data_free: bool, mixed_precision: str,
                    heldout: list[int] = ()) -> dict:
    """Everything that decides the evaluation's figures, for the report: compare FIDs only when these match
    (``reference`` None: no FID was measured). ``classes``: the forgotten and the D_r classes; ``heldout``: the
    evaluated classes outside D_r."""
    return {
        **asdict(protocol),
        "classifier": classifier_name,
        "classes": classes,
        "heldout_classes": list(heldout),
        **fid.describe(),
        "fid_reference": "none (no real images; pass --data)" if reference is None
        else "original model's samples" if data_free else "real retain images",
        "reference_per_class": {str(c): len(images) for c, images in (reference or {}).items()},
        "weights": "raw (no EMA)",
        "data_free": data_free,
        "mixed_precision": mixed_precision,
    }
