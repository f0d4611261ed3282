"""Scoring a class-conditional generator from Python, with the figures and protocol record a forget run reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from accelerate import Accelerator
from torch import nn

from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.generator_eval import SamplingProtocol, fid_setup, generator_metrics, protocol_record, reference_features, reference_images
from genunlearn.models.sampling import pipeline_for
from genunlearn.models.pipeline import Pipeline, make_pipeline, pipeline_num_classes
from genunlearn.tasks.diffusion import DiffusionTask


@dataclass
class GeneratorScores:
    """``metrics``: the figures a forget run reports before and after (``forget_acc``, ``forget_entropy``,
    ``forget_prob``, ``remain_acc``, ``fid_remain``, per-class tables); ``evaluation``: its protocol record;
    ``samples``: the samples per class, ``[N, C, H, W]`` in [-1, 1]."""

    metrics: dict
    evaluation: dict
    samples: dict[int, torch.Tensor]


def evaluate_generator(
    source: DiffusionTask | Pipeline,
    judge: nn.Module,
    forget: Sequence[int],
    *,
    model: nn.Module | None = None,
    remain: Sequence[int] | None = None,
    reference: torch.utils.data.Dataset | None = None,
    samples_per_class: int = 100,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    fid_features: str = "classifier",
    judge_name: str | None = None,
    accelerator: Accelerator | None = None,
) -> GeneratorScores:
    """Sample ``samples_per_class`` images of the ``forget`` and ``remain`` classes (default: all others) with DDIM
    (``steps``, guidance scale ``guidance``, seeded per class), label them with ``judge`` (images in [-1, 1] ->
    logits) and measure the remain FID against ``reference`` (real images with labels; default: the task's training
    data, which is the original model's samples for a data-free task; no FID for a bare pipeline without one).

    ``source``: a diffusion task (its model, or ``model``, e.g. ``unlearn(...).model``) or a pipeline.
    ``fid_features``: ``classifier`` (the judge's pre-logit features), ``inception`` or a timm model name."""
    accelerator = accelerator or make_accelerator()
    task = source if isinstance(source, DiffusionTask) else None
    if task is not None:
        num_classes, pipeline = task.num_classes, pipeline_for(task, model)
    else:
        num_classes = pipeline_num_classes(source)
        held = source if model is None else make_pipeline(model, source.scheduler, source.vae, num_classes,
                                                           id2label=source.config.get("id2label"))
        pipeline = pipeline_for(held)  # DDIM on the pipeline's own noise schedule, as a forget run samples
    forgotten = [int(c) for c in forget]
    remaining = [c for c in range(num_classes) if c not in forgotten] if remain is None else [int(c) for c in remain]
    if any(not 0 <= c < num_classes for c in forgotten + remaining):
        raise UserError(f"classes must be in 0-{num_classes - 1}; got forget {forgotten}, remain {remaining}")
    protocol = SamplingProtocol(per_class=samples_per_class, guidance=guidance, steps=steps, seed=seed)
    name = judge_name or type(judge).__name__
    fid = fid_setup(fid_features, judge, name, "torchmetrics", None, accelerator.device)
    real_images = None
    if reference is not None:  # the user's images as they are
        real_images = reference_images(None, reference, remaining)
    elif task is not None:  # the task's data, decoded when it holds latents
        real_images = reference_images(task, task.train_data, remaining)
    metrics, samples = generator_metrics(pipeline, judge.to(accelerator.device).eval(), forgotten, remaining,
                                         None if real_images is None else reference_features(real_images, fid), fid, protocol,
                                         accelerator)
    own_samples = reference is None and task is not None and bool(getattr(task.train_data, "generated", False))
    record = protocol_record(protocol, fid, name, forgotten + remaining, real_images, own_samples, accelerator.mixed_precision)
    return GeneratorScores(metrics, record, samples)

