"""``random_label``: train D_f towards random other labels while descending the loss of D_r (no mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.objectives import random_other_labels
from genunlearn.methods.common import unlearn_with_loop
from genunlearn.methods.registry import UnlearnResult, register_method


@dataclass
class RandomLabelConfig(LoopConfig):
    """``forget_weight * rl(D_f) + retain_weight * CE(D_r)`` with SGD (SalUn's classifier RL baseline optimiser)."""

    forget_weight: float = 1.0
    retain_weight: float = 1.0


def random_label_step(ctx: StepContext) -> dict[str, float]:
    """One step; forget and retain batches share one forward pass (DDP allows one forward per backward)."""
    forget_images, forget_labels = ctx.forget.next()
    retain_images, retain_labels = ctx.retain.next()
    labels = torch.cat([random_other_labels(forget_labels, ctx.task.num_classes, ctx), retain_labels])
    losses = ctx.task.loss(ctx.model, (torch.cat([forget_images, retain_images]), labels))
    forget_loss, retain_loss = losses[: len(forget_labels)].mean(), losses[len(forget_labels) :].mean()
    cfg: RandomLabelConfig = ctx.cfg
    ctx.backward_step(cfg.forget_weight * forget_loss + cfg.retain_weight * retain_loss)
    return {"forget_rl_loss": forget_loss.item(), "retain_loss": retain_loss.item()}


@register_method("random_label", "random other labels on the forget set plus retain descent, no mask", RandomLabelConfig)
def run(task, split, cfg: RandomLabelConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    return unlearn_with_loop(task, split, cfg, accelerator, random_label_step, checkpoint_dir=checkpoint_dir, resume=resume)
