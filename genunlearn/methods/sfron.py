"""``sfron``: SFR-on (Huang et al., NeurIPS 2024), forget-remain balanced saliency plus fast-slow remain geometry."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from accelerate import Accelerator
from torch import nn

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.geometry import SlowWeights, cosine_decay, fast_slow_iteration, joint_iteration
from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.masks import ParameterMask, fisher_ratio_mask
from genunlearn.engine.objectives import FORGET_OBJECTIVES, forget_objective
from genunlearn.engine.saliency import cached_gradient_statistics
from genunlearn.engine.sharding import is_sharded
from genunlearn.errors import UserError
from genunlearn.engine.lora_training import mask_modules
from genunlearn.methods.common import unlearn_with_loop, working_copy
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.tasks.base import Task


@dataclass
class SFRonConfig(LoopConfig):
    """Defaults: the classifier reference's CIFAR-10 setting (K1nght/Unified-Unlearning-w-Remain-Geometry,
    Classification/unlearn/sfron.py and main_random.py): batch 128, SGD 0.01 momentum 0.9 wd 5e-4 with a cosine
    schedule, 1500 iterations, adaga with λ = 0.5, α = 25 cosine-decayed, a forget step every 5 iterations clipped
    at 7.0, unclipped remain steps, γ = 1, no slow-weight pull (β_s = 1), unclipped Fishers at the unlearning batch.
    ``fisher_clip``: each Fisher batch gradient's norm bound (the DDPM reference's 1.0); ``fisher_batch_size``: the
    Fishers' global batch (None: the unlearning batch times the processes; SFR-on's DiT reference uses 1);
    ``fisher_batches``: batch gradients averaged per set, drawn from the set cycled in a shuffled order (None: one
    pass in order; the DDPM reference averages ⌈5000/128⌉ = 40 on a CIFAR-10 class, the DiT reference 2000)."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 0.01
    schedule: str = "cosine"
    forget_objective: str = "adaga"
    forget_weight: float = 25.0
    decay_forget_weight: bool = True
    retain_weight: float = 1.0
    temperature: float = 0.5
    forget_every: int = 5
    forget_clip: float | None = 7.0
    retain_clip: float | None = None
    use_mask: bool = True
    mask_threshold: float = 1.0
    fisher_clip: float | None = None
    fisher_batch_size: int | None = None
    fisher_batches: int | None = None
    lookahead: float = 1.0
    joint: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.forget_objective not in FORGET_OBJECTIVES:
            raise UserError(f"unknown forget_objective {self.forget_objective!r}; use one of {', '.join(FORGET_OBJECTIVES)}")
        if self.forget_every < 1:
            raise UserError(f"forget_every must be at least 1, got {self.forget_every}")
        if self.fisher_batch_size is not None and self.fisher_batch_size < 1:
            raise UserError(f"fisher_batch_size must be at least 1, got {self.fisher_batch_size}")
        if self.fisher_batches is not None and self.fisher_batches < 1:
            raise UserError(f"fisher_batches must be at least 1, got {self.fisher_batches}")
        if not 0.0 < self.lookahead <= 1.0:
            raise UserError(f"lookahead must be in (0, 1], got {self.lookahead}")


def sfron_mask(task: Task, split: ForgetSplit, cfg: SFRonConfig, accelerator: Accelerator,
               model: nn.Module | None = None) -> tuple[ParameterMask, dict]:
    """Fishers of the original model on D_f and D_r (the task's importance loss, one batch size for both; independent
    draws from the run's seed) and their ratio mask; ``model``: the original's working copy, sharded or not (None:
    ``task.model`` itself)."""
    started = time.perf_counter()
    model = model if model is not None else task.model.to(accelerator.device)
    fisher_batch = cfg.fisher_batch_size or cfg.batch_size * accelerator.num_processes
    stats = {}
    for part in ("forget", "retain"):
        stats[part] = cached_gradient_statistics(
            task.cache_dir, model, task.importance_loss, task.importance_loss_id, getattr(split, part), accelerator,
            batch_size=fisher_batch, transform="square", max_norm=cfg.fisher_clip, batches=cfg.fisher_batches,
            seed=cfg.seed, stream=f"fisher {part}", desc=f"Fisher on {part} set",
        )
    names = [n for n, _ in model.named_parameters()]
    mask = fisher_ratio_mask(names, stats["forget"][0], stats["retain"][0], cfg.mask_threshold, is_sharded(model))
    info = {
        "mask_kept_fraction": mask.kept_fraction(),
        "mask_time_s": time.perf_counter() - started,
        "mask_cached": stats["forget"][1] and stats["retain"][1],
        "fisher_batch_size": fisher_batch,
    }
    return mask, info


def sfron_step(ctx: StepContext, mask: ParameterMask | None, slow_weights: SlowWeights) -> dict[str, float]:
    cfg: SFRonConfig = ctx.cfg
    alpha = cosine_decay(cfg.forget_weight, ctx.step, cfg.steps) if cfg.decay_forget_weight else cfg.forget_weight
    forget_loss = None
    if ctx.step % cfg.forget_every == 0:
        batch = ctx.forget.next()
        forget_loss = lambda: alpha * forget_objective(cfg.forget_objective, ctx.task, ctx.model, batch, ctx, cfg.temperature)  # noqa: E731
    retain_loss = lambda: cfg.retain_weight * ctx.task.loss(ctx.model, ctx.retain.next()).mean()  # noqa: E731
    params = ctx.parameters()
    slow_weights.begin(params)
    if cfg.joint:
        figures = joint_iteration(ctx, forget_loss, retain_loss, mask=mask, max_norm=cfg.forget_clip)
    else:
        figures = fast_slow_iteration(ctx, forget_loss, retain_loss, mask=mask, forget_clip=cfg.forget_clip, retain_clip=cfg.retain_clip)
    slow_weights.end(params)
    return {**figures, "forget_weight": alpha}


@register_method("sfron", "SFR-on: Fisher-ratio saliency mask, adaptive forget ascent, fast-slow remain-geometry steps", SFRonConfig,
                 shards=True, lora=True)
def run(task, split, cfg: SFRonConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    model = working_copy(task, accelerator)
    mask, info = sfron_mask(task, split, cfg, accelerator, model) if cfg.use_mask else (None, {})
    modules = mask_modules(model, mask) if cfg.lora_rank and mask is not None else None  # LoRA: the mask at module level
    step = partial(sfron_step, mask=None if cfg.lora_rank else mask, slow_weights=SlowWeights(cfg.lookahead))
    return unlearn_with_loop(task, split, cfg, accelerator, step, checkpoint_dir=checkpoint_dir, resume=resume, info=info,
                             model=None if cfg.lora_rank else model, lora_modules=modules)
