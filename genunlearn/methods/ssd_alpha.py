"""SSD's selection threshold α: the window the forget set's share of D implies, warnings that name the fix, and
``alpha="auto"`` (our addition, not the reference's): the smallest dampening that forgets, found by bisection.

A weight only D_f uses gets I_D ≈ share · I_f (share = |D_f| / |D|, D_f's part of D's batches), so ``I_f > α·I_D``
can select it only for α < 1/share; α ≤ 1 selects weights D uses as much as D_f does."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset, Subset

from genunlearn.advice import advise
from genunlearn.data.split import ForgetSplit
from genunlearn.errors import UserError
from genunlearn.eval.classify import accuracy, predict_logits

# The reference's selection thresholds α (if-loops/selective-synaptic-dampening, forget_*_main.py): ResNets use
# 10 for every kind of forgetting; ViTs 5 (full class), 25 (sub-class), 10 (random samples).
RESNET_ALPHA = 10.0
VIT_ALPHA = {"class": 5.0, "subclass": 25.0, "random": 10.0}
AUTO_MIN_HELDOUT = 32  # no error in 32 held-out samples bounds the class's recognition below 0.09 (95%, rule of three)
AUTO_STEPS = 12  # bisection steps on log α: the bracket [1, 1/share] narrowed 4096-fold
FORGOT_NOTHING = 0.9  # forget accuracy kept above this fraction of its value before: "forgot nothing"


def default_alpha(model: nn.Module, forget_kind: str) -> float:
    """The reference's α for this architecture (timm VisionTransformer or not) and kind of forgetting."""
    from timm.models.vision_transformer import VisionTransformer

    return VIT_ALPHA[forget_kind] if isinstance(model, VisionTransformer) else RESNET_ALPHA


def alpha_ceiling(split: ForgetSplit) -> float:
    """1/share: above it no weight that only D_f uses can be selected."""
    return (len(split.retain) + len(split.forget)) / len(split.forget)


def check_alpha(alpha: float, split: ForgetSplit, method: str, main_process: bool) -> None:
    """Warn, before any work, when ``alpha`` lies outside (1, 1/share)."""
    ceiling = alpha_ceiling(split)
    if alpha >= ceiling:
        advise(f"{method} alpha={alpha:g} is at or above 1/share = {ceiling:.3g} (D_f is {1 / ceiling:.1%} of D): weights "
               f"only D_f uses cannot be selected, so it will likely forget nothing; pass alpha below {ceiling:.3g}, or "
               "alpha=auto", main_process)
    elif alpha <= 1.0:
        advise(f"{method} alpha={alpha:g} <= 1 selects weights D uses as much as D_f does, which costs retain accuracy; "
               f"pass alpha in (1, {ceiling:.3g}), or alpha=auto", main_process)


def forget_accuracy(model: nn.Module, data: Dataset, accelerator: Accelerator) -> float:
    return accuracy(*predict_logits(model.to(accelerator.device).eval(), data, accelerator))


def check_forgetting(before: float, after: float, selected_fraction: float, method: str, main_process: bool) -> None:
    """Warn when dampening left forget accuracy where it was (it selected too few weights)."""
    if before > 0 and after >= FORGOT_NOTHING * before:
        advise(f"{method} forgot almost nothing: forget accuracy {before:.3f} -> {after:.3f}, with {selected_fraction:.3%} of "
               "the weights selected; lower alpha (or pass alpha=auto)", main_process)


def heldout_slice(split: ForgetSplit, fraction: float, seed: int, method: str) -> tuple[Subset, Subset]:
    """``(fit, held out)``: D_f split by ``seed``; I_f comes from the first, the bisection judges on the second, which
    holds a ``fraction`` of D_f but at least ``AUTO_MIN_HELDOUT`` samples (at most half of D_f)."""
    if split.spec.kind != "class":
        raise UserError(f"{method} alpha=auto targets class forgetting; pass a number for alpha")
    count = len(split.forget)
    held = max(1, round(fraction * count), min(AUTO_MIN_HELDOUT, count // 2))
    if count - held < 1:
        raise UserError(f"alpha=auto needs at least 2 forget samples (D_f has {count}); pass a number for alpha")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(split.forget, sorted(order[held:])), Subset(split.forget, sorted(order[:held]))


def auto_alpha(model: nn.Module, dampen: Callable[..., object], heldout: Dataset, target: float, ceiling: float,
               accelerator: Accelerator) -> tuple[float, float]:
    """``(α, held-out forget accuracy)``: the largest α in [1, ``ceiling``] (the fewest weights dampened) whose
    ``dampen(copy of model, alpha=α)`` (in place) leaves forget accuracy <= ``target`` on ``heldout``, by bisection on
    log α (forget accuracy rises with α); α = 1 with its accuracy when none reaches the target."""
    def measured(alpha: float) -> float:
        copied = copy.deepcopy(model)
        dampen(copied, alpha=alpha)
        return forget_accuracy(copied, heldout, accelerator)

    low, high = 0.0, math.log(max(ceiling, 1.0 + 1e-6))
    low_acc = measured(1.0)
    if low_acc > target:
        return 1.0, low_acc
    for _ in range(AUTO_STEPS):
        middle = (low + high) / 2
        middle_acc = measured(math.exp(middle))
        if middle_acc <= target:
            low, low_acc = middle, middle_acc
        else:
            high = middle
    return math.exp(low), low_acc
