"""``ssd`` and ``lfssd``: Selective Synaptic Dampening (Foster et al., AAAI 2024) and its label-free variant.

Retrain-free: importances I_D (all training data) and I_f (forget set) from the engine's gradient statistics;
every parameter with I_f > α·I_D (strict) is scaled by β = min(λ·I_D / I_f, 1). Buffers are untouched.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.saliency import BatchLoss, GradientTransform, cached_gradient_statistics
from genunlearn.errors import UserError
from genunlearn.methods.common import require_classifier
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.tasks.base import Task

# The reference's selection thresholds α (if-loops/selective-synaptic-dampening, forget_*_main.py): ResNets use
# 10 for every kind of forgetting; ViTs 5 (full class), 25 (sub-class), 10 (random samples).
RESNET_ALPHA = 10.0
VIT_ALPHA = {"class": 5.0, "subclass": 25.0, "random": 10.0}


@dataclass
class SSDConfig:
    """Reference defaults (src/ssd.py): λ = 1, α per architecture and forget kind (None picks it). One batch
    size serves both importance passes (importances depend on it; it is the global batch, so any process
    count gives the same importances; 64 is forget_full_class_main.py's). ``parameters``: optional regular
    expression; only parameters whose name matches are dampened (default: all, as the reference).
    ``importance_order``: the order of D for I_D, which matters because mini-batch-mean gradients are squared:
    ``reference`` (``ConcatDataset((retain, forget))`` unshuffled, so D_f fills D's last batches; depends on the
    split) or ``native`` (the training set's own order, one I_D per model whatever is forgotten)."""

    alpha: float | None = None
    dampening: float = 1.0
    batch_size: int = 64
    parameters: str | None = None
    importance_order: str = "reference"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha is not None and self.alpha <= 0 or self.dampening <= 0 or self.batch_size < 1:
            raise UserError("ssd needs alpha > 0, dampening > 0 and batch_size >= 1")
        if self.importance_order not in ("reference", "native"):
            raise UserError(f"ssd importance_order must be reference or native, got {self.importance_order!r}")
        if self.parameters is not None:
            try:
                re.compile(self.parameters)
            except re.error as exc:
                raise UserError(f"ssd parameters={self.parameters!r} is not a regular expression ({exc})") from None


def default_alpha(model: nn.Module, forget_kind: str) -> float:
    """The reference's α for this architecture (timm VisionTransformer or not) and kind of forgetting."""
    from timm.models.vision_transformer import VisionTransformer

    return VIT_ALPHA[forget_kind] if isinstance(model, VisionTransformer) else RESNET_ALPHA


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
                    label_free: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """``(I_D, I_f, whether I_D came from the cache)``, per parameter in ``model.parameters()`` order. I_D is over
    ``importance_dataset`` (cached per model and, in the reference order, per split)."""
    loss, loss_id, transform = importance_objective(task, label_free)
    whole_data = importance_dataset(task, split, cfg.importance_order)
    whole, cached = cached_gradient_statistics(task.cache_dir, model, loss, loss_id, whole_data, accelerator,
                                               batch_size=cfg.batch_size, transform=transform, seed=cfg.seed,
                                               stream="importance whole", desc="importance on D")
    forget, _ = cached_gradient_statistics(task.cache_dir, model, loss, loss_id, split.forget, accelerator,
                                           batch_size=cfg.batch_size, transform=transform, seed=cfg.seed,
                                           stream="importance forget", desc="importance on D_f")
    return whole, forget, cached


@torch.no_grad()
def dampen(model: nn.Module, whole: list[torch.Tensor], forget: list[torch.Tensor], alpha: float, dampening: float,
           parameters: str | None = None) -> tuple[int, int]:
    """Scale every selected weight (I_f > α·I_D, strict) by β = min(λ·I_D / I_f, 1), in place; parameters whose
    name does not match ``parameters`` (a regex; None: all) are left alone. Returns (selected, considered) counts."""
    selected = considered = 0
    for (name, param), importance_whole, importance_forget in zip(model.named_parameters(), whole, forget):
        if parameters is not None and re.search(parameters, name) is None:
            continue
        chosen = importance_forget > alpha * importance_whole
        beta = (dampening * importance_whole[chosen] / importance_forget[chosen]).clamp(max=1.0)
        param[chosen] = param[chosen] * beta.to(param.dtype)
        selected += int(chosen.sum())
        considered += param.numel()
    return selected, considered


def run_ssd(task: Task, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator, *, label_free: bool) -> UnlearnResult:
    started = time.perf_counter()
    model = copy.deepcopy(task.model).to(accelerator.device)
    whole, forget, cached = ssd_importances(task, model, split, cfg, accelerator, label_free)
    alpha = cfg.alpha if cfg.alpha is not None else default_alpha(model, split.spec.kind)
    selected, considered = dampen(model, whole, forget, alpha, cfg.dampening, cfg.parameters)
    if considered == 0:
        raise UserError(f"ssd parameters={cfg.parameters!r} matches no parameter name")
    info = {"alpha": alpha, "selected_fraction": selected / considered, "selected": selected,
            "importance_order": cfg.importance_order, "importance_whole_cached": cached}
    return UnlearnResult(model.eval(), [], 0, time.perf_counter() - started, info)


@register_method("ssd", "Selective Synaptic Dampening: dampen weights far more important to D_f than to D (no training)", SSDConfig,
                 kinds=("classifier",))
def ssd(task: Task, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator, *, checkpoint_dir=None,
        resume: bool = False) -> UnlearnResult:
    return run_ssd(task, split, cfg, accelerator, label_free=False)


@register_method("lfssd", "label-free SSD: importances from |grad| of the logits' squared norm (no labels needed)", SSDConfig,
                 kinds=("classifier",))
def lfssd(task: Task, split: ForgetSplit, cfg: SSDConfig, accelerator: Accelerator, *, checkpoint_dir=None,
          resume: bool = False) -> UnlearnResult:
    return run_ssd(task, split, cfg, accelerator, label_free=True)
