"""Forget objectives over any task's per-sample loss. Each returns a scalar to *minimise*."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from genunlearn.errors import UserError
from genunlearn.tasks.base import Batch, Task

if TYPE_CHECKING:
    from genunlearn.engine.loop import StepContext

FORGET_OBJECTIVES = ("ga", "adaga", "rl")


def gradient_ascent(task: Task, model: nn.Module, batch: Batch) -> torch.Tensor:
    """``ga``: minus the mean loss on forget samples with their true labels."""
    return -task.loss(model, batch).mean()


def adaptive_weights(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """``w_i = l_i^-λ / Σ_j l_j^-λ`` for per-sample losses ``[B]`` (detached; 1e-8 keeps l = 0 finite)."""
    inverse = 1.0 / (losses.detach().clamp_min(0).pow(temperature) + 1e-8)
    return inverse / inverse.sum()


def adaptive_gradient_ascent(task: Task, model: nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """``adaga`` (SFR-on): ``-Σ_i w_i l_i`` with ``adaptive_weights``; well-remembered samples are pushed hardest."""
    losses = task.loss(model, batch)
    return -(adaptive_weights(losses, temperature) * losses).sum()


def check_rl_shift(shift: int, num_classes: int) -> None:
    """A UserError unless (c + ``shift``) mod ``num_classes`` is another class than c."""
    if shift % num_classes == 0:
        raise UserError(f"rl_shift {shift} maps every class onto itself with {num_classes} classes; use 1..{num_classes - 1}")


def random_other_labels(labels: torch.Tensor, num_classes: int, ctx: "StepContext") -> torch.Tensor:
    """The other label of each true label ``[B]``: uniformly random (shift by 1..K-1, mod K), or with
    ``ctx.cfg.rl_shift`` = k the fixed (c + k) mod K, as the references fix it (DDPM k = 1, DiT k = 100)."""
    shift = ctx.cfg.rl_shift
    if shift is None:
        return (labels + ctx.global_randint(num_classes - 1, len(labels)) + 1) % num_classes
    check_rl_shift(shift, num_classes)
    return (labels + shift) % num_classes


def random_label(task: Task, model: nn.Module, batch: Batch, ctx: "StepContext") -> torch.Tensor:
    """``rl``: the task's random-label loss towards *other* classes (``random_other_labels``; form ``ctx.cfg.rl_form``),
    batch mean; a text-to-image task pulls towards its anchor prompt when it has one, else towards uniformly drawn
    ones of its ``rl_prompts`` when it names them."""
    anchor, targets = getattr(task, "anchor_prompt", None), getattr(task, "rl_prompts", None)
    if anchor is not None:
        labels = torch.full_like(batch[1], anchor)
    elif targets is not None:
        labels = torch.tensor(targets, device=batch[1].device)[ctx.global_randint(len(targets), len(batch[1]))]
    else:
        labels = random_other_labels(batch[1], task.num_classes, ctx)
    return task.random_label_loss(model, batch, labels, form=ctx.cfg.rl_form).mean()


def forget_objective(name: str, task: Task, model: nn.Module, batch: Batch, ctx: "StepContext", temperature: float = 0.5) -> torch.Tensor:
    """The objective called ``name`` (one of ``FORGET_OBJECTIVES``) on a forget batch."""
    if name == "ga":
        return gradient_ascent(task, model, batch)
    if name == "adaga":
        return adaptive_gradient_ascent(task, model, batch, temperature)
    if name == "rl":
        return random_label(task, model, batch, ctx)
    raise ValueError(f"unknown forget objective {name!r}; use one of {', '.join(FORGET_OBJECTIVES)}")
