"""``grad_ascent``: ascend the loss of D_f with true labels (no retain term)."""

from __future__ import annotations

from dataclasses import dataclass

from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.objectives import gradient_ascent
from genunlearn.methods.common import unlearn_with_loop
from genunlearn.methods.registry import UnlearnResult, register_method


@dataclass
class GradAscentConfig(LoopConfig):
    """Few steps at a small learning rate: unbounded ascent soon destroys the whole model."""

    steps: int = 30
    lr: float = 0.001


def grad_ascent_step(ctx: StepContext) -> dict[str, float]:
    loss = gradient_ascent(ctx.task, ctx.model, ctx.forget.next())
    ctx.backward_step(loss)
    return {"forget_loss": -loss.item()}


@register_method("grad_ascent", "gradient ascent on the forget set's loss (ga objective only)", GradAscentConfig,
                 shards=True, lora=True)
def run(task, split, cfg: GradAscentConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    return unlearn_with_loop(
        task, split, cfg, accelerator, grad_ascent_step, checkpoint_dir=checkpoint_dir, resume=resume, uses_retain=False
    )
