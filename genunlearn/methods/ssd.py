"""``ssd`` and ``lfssd``: Selective Synaptic Dampening (Foster et al., AAAI 2024) and its label-free variant.

Retrain-free: importances I_D (all training data) and I_f (forget set) from the engine's gradient statistics;
every parameter with I_f > α·I_D (strict) is scaled by β = min(λ·I_D / I_f, 1). Buffers are untouched.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import partial

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.saliency import BatchLoss, GradientTransform, cached_gradient_statistics
from genunlearn.engine.sharding import gathered_copy, sharding_record, sharding_requested
from genunlearn.errors import UserError
from genunlearn.methods.common import require_classifier, working_copy
from genunlearn.methods.registry import UnlearnResult, register_method
import genunlearn.methods.ssd_alpha as ssd_alpha
from genunlearn.methods.ssd_dampen import dampen
from genunlearn.tasks.base import Task


@dataclass
class SSDConfig:
    """Reference defaults (src/ssd.py): λ = 1, α per architecture and forget kind (None picks it). One batch
    size serves both importance passes (importances depend on it; it is the global batch, so any process
    count gives the same importances; 64 is forget_full_class_main.py's). ``parameters``: optional regular
    expression; only parameters whose name matches are dampened (default: all, as the reference).
    ``importance_order``: the order of D for I_D, which matters because mini-batch-mean gradients are squared:
    ``reference`` (``ConcatDataset((retain, forget))`` unshuffled, so D_f fills D's last batches; depends on the
    split) or ``native`` (the training set's own order, one I_D per model whatever is forgotten). ``alpha="auto"``
    (our addition, not the reference's; class forgetting): the largest α, so the least dampening, whose forget accuracy
    on a held-out ``auto_heldout`` share of D_f (at least 32 samples) is <= ``auto_target`` (default 0: a model
    retrained without the class never predicts it); I_f then comes from the rest of D_f (``methods.ssd_alpha``)."""

    alpha: float | str | None = None
    auto_target: float = 0.0
    auto_heldout: float = 0.2
    dampening: float = 1.0
    batch_size: int = 64
    parameters: str | None = None
    importance_order: str = "reference"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str) and self.alpha != "auto":
            raise UserError(f"ssd alpha must be a number or auto, got {self.alpha!r}")
        if isinstance(self.alpha, float) and self.alpha <= 0 or self.dampening <= 0 or self.batch_size < 1:
            raise UserError("ssd needs alpha > 0, dampening > 0 and batch_size >= 1")
        if not (0 <= self.auto_target < 1 and 0 < self.auto_heldout < 1):
            raise UserError("ssd needs auto_target in [0, 1) and auto_heldout in (0, 1)")
        if self.importance_order not in ("reference", "native"):
            raise UserError(f"ssd importance_order must be reference or native, got {self.importance_order!r}")
        if self.parameters is not None:
            try:
                re.compile(self.parameters)
            except re.error as exc:
                raise UserError(f"ssd parameters={self.parameters!r} is not a regular expression ({exc})") from None


def importance_objective(task: Task, label_free: bool) -> tuple[BatchLoss, str, GradientTransform]:
    """``(per-sample loss, its cache name, transform)``: SSD squares the cross-entropy gradients (the Fisher
    diagonal); LF-SSD takes |grad| of the squared L2 norm of the logits, which needs no labels."""
    require_classifier(task, "ssd and lfssd")
    if label_free:
        return (lambda model, batch: task.logits(model, batch[0]).pow(2).sum(dim=1)), "logit_sq_norm", "abs"
    return task.importance_loss, task.importance_loss_id, "square"


def importance_dataset(task: Task, split: ForgetSplit, order: str) -> Dataset:
    """D for I_D: ``ConcatDataset((D_r, D_f))`` in that order (``reference``) or the training set as it is (``native``)."""
    return ConcatDataset((split.retain, split.forget)) if order == "reference" else task.train_data


def ssd_importances(task: Task, model: nn.Module, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator,
                    label_free: bool, forget_data: Dataset | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """``(I_D, I_f, whether I_D came from the cache)``, per parameter in ``model.parameters()`` order. I_D is over
    ``importance_dataset`` (cached per model and, in the reference order, per split); I_f over ``forget_data``
    (default: D_f)."""
    loss, loss_id, transform = importance_objective(task, label_free)
    whole_data = importance_dataset(task, split, cfg.importance_order)
    whole, cached = cached_gradient_statistics(task.cache_dir, model, loss, loss_id, whole_data, accelerator,
                                               batch_size=cfg.batch_size, transform=transform, seed=cfg.seed,
                                               stream="importance whole", desc="importance on D")
    forget, _ = cached_gradient_statistics(task.cache_dir, model, loss, loss_id, forget_data or split.forget, accelerator,
                                           batch_size=cfg.batch_size, transform=transform, seed=cfg.seed,
                                           stream="importance forget", desc="importance on D_f")
    return whole, forget, cached


def run_ssd(task: Task, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator, *, label_free: bool) -> UnlearnResult:
    started, name, main = time.perf_counter(), "lfssd" if label_free else "ssd", accelerator.is_main_process
    auto, sharded = cfg.alpha == "auto", sharding_requested(accelerator)
    if auto and sharded:
        raise UserError(f"{name} alpha=auto does not run sharded (its search scores dampened copies); pass a number for "
                        "alpha, or launch without --use_fsdp")
    model = working_copy(task, accelerator)
    fit, heldout = ssd_alpha.heldout_slice(split, cfg.auto_heldout, cfg.seed, name) if auto else (split.forget, None)
    if not auto:
        alpha = cfg.alpha if cfg.alpha is not None else ssd_alpha.default_alpha(model, split.spec.kind)
        ssd_alpha.check_alpha(alpha, split, name, main)
    whole, forget, cached = ssd_importances(task, model, split, cfg, accelerator, label_free, fit)
    info = {}
    if auto:
        in_place = partial(dampen, whole=whole, forget=forget, dampening=cfg.dampening, parameters=cfg.parameters)
        alpha, info["auto_heldout_forget_acc"] = ssd_alpha.auto_alpha(model, in_place, heldout, cfg.auto_target,
                                                                      ssd_alpha.alpha_ceiling(split), accelerator)
    before = ssd_alpha.forget_accuracy(gathered_copy(model) if sharded else model, split.forget, accelerator)
    selected, considered = dampen(model, whole, forget, alpha, cfg.dampening, cfg.parameters)
    if sharded:
        model, info = gathered_copy(model), {**info, **sharding_record(accelerator.num_processes)}
    if considered == 0:
        raise UserError(f"ssd parameters={cfg.parameters!r} matches no parameter name")
    ssd_alpha.check_forgetting(before, ssd_alpha.forget_accuracy(model, split.forget, accelerator), selected / considered, name, main)
    info.update(alpha=alpha, selected_fraction=selected / considered, selected=selected,
                importance_order=cfg.importance_order, importance_whole_cached=cached)
    return UnlearnResult(model.eval(), [], 0, time.perf_counter() - started, info)


@register_method("ssd", "Selective Synaptic Dampening: dampen weights far more important to D_f than to D (no training)", SSDConfig,
                 kinds=("classifier",), shards=True)
def ssd(task: Task, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator, *, checkpoint_dir=None,
        resume: bool = False) -> UnlearnResult:
    return run_ssd(task, split, cfg, accelerator, label_free=False)


@register_method("lfssd", "label-free SSD: importances from |grad| of the logits' squared norm (no labels needed)", SSDConfig,
                 kinds=("classifier",), shards=True)
def lfssd(task: Task, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator, *, checkpoint_dir=None,
          resume: bool = False) -> UnlearnResult:
    return run_ssd(task, split, cfg, accelerator, label_free=True)
