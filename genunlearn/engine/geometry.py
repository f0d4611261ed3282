"""Remain-geometry updates: SFR-on's fast-slow iteration, its joint ablation, the slow-weight buffer and
the cosine-decayed forget weight.

The fast step moves the weights along the masked forget gradient; the slow step then takes the
retain gradient *at the moved weights*, ∇L_r(θ - Δ) ≈ ∇L_r(θ) - H_r Δ, which injects the remain
Hessian without forming it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from genunlearn.engine.loop import StepContext
from genunlearn.engine.masks import ParameterMask

LossThunk = Callable[[], torch.Tensor]


def cosine_decay(weight: float, step: int, total: int) -> float:
    """``α_k = α (1 + cos(π k / K)) / 2``."""
    return weight * (1.0 + math.cos(math.pi * step / total)) / 2.0


def fast_slow_iteration(
    ctx: StepContext,
    forget_loss: LossThunk | None,
    retain_loss: LossThunk,
    *,
    mask: ParameterMask | None,
    forget_clip: float | None,
    retain_clip: float | None,
) -> dict[str, float]:
    """Fast step on ``forget_loss()`` (gradient masked, then clipped), then a slow step
    on ``retain_loss()``, evaluated only now, at the updated weights, with the same optimizer.
    A None ``forget_loss`` skips the fast step (SFR-on's ``forget_every``)."""
    figures = {}
    if forget_loss is not None:
        loss = forget_loss()
        figures["forget_objective"] = loss.item()
        figures["forget_grad_norm"] = ctx.backward_step(loss, mask=mask, max_norm=forget_clip)
    loss = retain_loss()
    figures["retain_loss"] = loss.item()
    figures["retain_grad_norm"] = ctx.backward_step(loss, max_norm=retain_clip)
    return figures


def joint_iteration(
    ctx: StepContext,
    forget_loss: LossThunk | None,
    retain_loss: LossThunk,
    *,
    mask: ParameterMask | None,
    max_norm: float | None,
) -> dict[str, float]:
    """The ``joint`` ablation: one step on ``retain_loss + forget_loss`` at the same weights, with the mask on
    the forget gradient only (the reference's joint mode leaves it unmasked by a bug)."""
    figures = {}
    ctx.optimizer.zero_grad(set_to_none=True)
    if forget_loss is not None:
        with ctx.accelerator.no_sync(ctx.model):
            loss = forget_loss()
            ctx.accelerator.backward(loss)
        figures["forget_objective"] = loss.item()
        if mask is not None:
            mask.mask_gradients(ctx.parameters())
    loss = retain_loss()
    ctx.accelerator.backward(loss)
    figures["retain_loss"] = loss.item()
    figures["grad_norm"] = ctx.clip_gradients(max_norm)
    ctx.optimizer_step()
    return figures


class SlowWeights:
    """The optional lookahead pull ``θ ← (1 - β_s) θ_start + β_s θ_end`` once per iteration; β_s = 1 is off."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self._start: list[torch.Tensor] | None = None

    def begin(self, params: list[nn.Parameter]) -> None:
        if self.beta < 1.0:
            self._start = [p.detach().clone() for p in params]

    def end(self, params: list[nn.Parameter]) -> None:
        if self.beta < 1.0:
            with torch.no_grad():
                torch._foreach_lerp_([p.data for p in params], self._start, 1.0 - self.beta)
            self._start = None
