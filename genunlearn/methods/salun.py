"""``salun``: SalUn (Fan et al., ICLR 2024), random labels on the forget set through a gradient-saliency mask."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

from accelerate import Accelerator
from torch import nn

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.masks import ParameterMask, top_fraction_mask
from genunlearn.engine.objectives import random_label
from genunlearn.engine.saliency import cached_gradient_statistics
from genunlearn.engine.sharding import is_sharded
from genunlearn.errors import UserError
from genunlearn.engine.lora_training import mask_modules
from genunlearn.methods.common import unlearn_with_loop, working_copy
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.tasks.base import Task


@dataclass
class SalUnConfig(LoopConfig):
    """Defaults: the classifier reference (OPTML-Group/Unlearn-Saliency, Classification/unlearn/RL.py with a
    generate_mask.py mask, arg_parser.py): batch 256, SGD 0.01 momentum 0.9 wd 5e-4, the top 50% of
    |∇(-CE on D_f)| kept, each epoch one pass over D_f with random labels then one over D_r, 10 epochs (``epochs``
    wins over ``steps``). ``form: joint`` is the diffusion reference (DDPM/runners/diffusion.py, saliency_unlearn):
    every step one update on ``L_rl(D_f) + retain_weight · L(D_r)`` (β = 1e-3 against the task's retain loss, which
    the DDPM reference sums over C·H·W while L_rl is an element mean; β = 0 forgets every class), clipped, then
    masked; there an epoch is one pass over D_f (the SD reference's ``random_label.py`` runs 5), each step with a
    D_r batch beside it. ``mask_clip``: each saliency batch gradient's norm bound before it is summed (the DDPM reference's 1.0).
    ``hold_masked``: the classifier reference restores masked-out weights after every step (``RL.py``'s
    ``_restore_masked_params``, since its #33); in the diffusion references every step is masked, so Adam never moves
    them either."""

    batch_size: int = 256
    hold_masked: bool = True
    lr: float = 0.01
    mask_fraction: float = 0.5
    epochs: int | None = 10
    form: str = "alternate"
    retain_weight: float = 1e-3
    mask_clip: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_fraction <= 1.0:
            raise UserError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if self.form not in ("alternate", "joint"):
            raise UserError(f"unknown SalUn form {self.form!r}; use alternate (classifiers) or joint (diffusion)")


def salun_mask(task: Task, split: ForgetSplit, cfg: SalUnConfig, accelerator: Accelerator,
               model: nn.Module | None = None) -> tuple[ParameterMask, dict]:
    """``|mean_b ∇θ L(D_f batch)|`` of the original model (L the task's importance loss; SalUn ascends it, and the
    sign does not change the magnitude), globally top-``mask_fraction``; ``model``: the original's working copy,
    sharded or not (None: ``task.model`` itself)."""
    started = time.perf_counter()
    model = model if model is not None else task.model.to(accelerator.device)
    scores, cached = cached_gradient_statistics(
        task.cache_dir, model, task.importance_loss, task.importance_loss_id, split.forget, accelerator,
        batch_size=cfg.batch_size * accelerator.num_processes, transform="identity", max_norm=cfg.mask_clip,
        seed=cfg.seed, stream="saliency forget", desc="saliency on forget set",
    )
    names = [n for n, _ in model.named_parameters()]
    mask = top_fraction_mask(names, scores, cfg.mask_fraction, is_sharded(model))
    return mask, {"mask_kept_fraction": mask.kept_fraction(), "mask_time_s": time.perf_counter() - started, "mask_cached": cached}


def salun_step(ctx: StepContext, mask: ParameterMask, forget_batches: int, retain_batches: int) -> dict[str, float]:
    """Within each epoch: ``forget_batches`` random-label steps on D_f, then ``retain_batches`` steps on D_r."""
    if ctx.step % (forget_batches + retain_batches) < forget_batches:
        loss = random_label(ctx.task, ctx.model, ctx.forget.next(), ctx)
        ctx.backward_step(loss, mask=mask)
        return {"forget_rl_loss": loss.item()}
    loss = ctx.task.loss(ctx.model, ctx.retain.next()).mean()
    ctx.backward_step(loss, mask=mask)
    return {"retain_loss": loss.item()}


def salun_joint_step(ctx: StepContext, mask: ParameterMask) -> dict[str, float]:
    """One update on ``rl(D_f batch) + β · L(D_r batch)``: clip the whole gradient, then mask it."""
    forget = random_label(ctx.task, ctx.model, ctx.forget.next(), ctx)
    retain = ctx.task.loss(ctx.model, ctx.retain.next()).mean()
    norm = ctx.backward_step(forget + ctx.cfg.retain_weight * retain, mask=mask, clip_before_mask=True)
    return {"forget_rl_loss": forget.item(), "retain_loss": retain.item(), "grad_norm": norm}


@register_method("salun", "SalUn: random labels on the forget set then retain descent, through a gradient-saliency mask", SalUnConfig,
                 shards=True, lora=True)
def run(task, split, cfg: SalUnConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    global_batch = cfg.batch_size * accelerator.num_processes
    forget_batches = math.ceil(len(split.forget) / global_batch)
    retain_batches = math.ceil(len(split.retain) / global_batch)
    if cfg.epochs is not None:
        per_epoch = forget_batches + retain_batches if cfg.form == "alternate" else forget_batches
        cfg = SalUnConfig(**{**cfg.__dict__, "steps": cfg.epochs * per_epoch, "epochs": None})
    model = working_copy(task, accelerator)
    mask, info = salun_mask(task, split, cfg, accelerator, model)
    modules = mask_modules(model, mask) if cfg.lora_rank else None  # LoRA: the mask at module level
    step_mask = None if cfg.lora_rank else mask
    if cfg.form == "joint":
        step = partial(salun_joint_step, mask=step_mask)
    else:
        step = partial(salun_step, mask=step_mask, forget_batches=forget_batches, retain_batches=retain_batches)
    return unlearn_with_loop(task, split, cfg, accelerator, step, checkpoint_dir=checkpoint_dir, resume=resume, info=info,
                             model=None if cfg.lora_rank else model, lora_modules=modules)
