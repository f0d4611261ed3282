"""``random_label``: train D_f towards random other labels while descending the loss of D_r (no mask)."""

from __future__ import annotations

from dataclasses import dataclass

from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.objectives import random_label
from genunlearn.methods.common import unlearn_with_loop
from genunlearn.methods.registry import UnlearnResult, register_method


@dataclass
class RandomLabelConfig(LoopConfig):
    """``forget_weight * rl(D_f) + retain_weight * L(D_r)`` with SGD (SalUn's classifier RL baseline optimiser);
    diffusion presets use Adam and the ε-matching rl (or ``rl_form: relabel``)."""

    forget_weight: float = 1.0
    retain_weight: float = 1.0


def random_label_step(ctx: StepContext) -> dict[str, float]:
    """One step on ``forget_weight · rl(D_f batch) + retain_weight · L(D_r batch)`` (rl in the task's form)."""
    cfg: RandomLabelConfig = ctx.cfg
    forget_loss = random_label(ctx.task, ctx.model, ctx.forget.next(), ctx)
    retain_loss = ctx.task.loss(ctx.model, ctx.retain.next()).mean()
    ctx.backward_step(cfg.forget_weight * forget_loss + cfg.retain_weight * retain_loss)
    return {"forget_rl_loss": forget_loss.item(), "retain_loss": retain_loss.item()}


@register_method("random_label", "random other labels on the forget set plus retain descent, no mask", RandomLabelConfig,
                 shards=True, lora=True)
def run(task, split, cfg: RandomLabelConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    return unlearn_with_loop(task, split, cfg, accelerator, random_label_step, checkpoint_dir=checkpoint_dir, resume=resume)
