"""Gradient checkpointing (activations recomputed in backward: less memory, about 30% slower) on the models we hold."""

from __future__ import annotations

from torch import nn

from genunlearn.errors import UserError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn it on through the model's own library: diffusers' ``enable_gradient_checkpointing`` (every diffusers denoiser
    genunlearn trains supports it) or timm's ``set_grad_checkpointing``; a UserError for a model with neither."""
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise UserError(f"{type(model).__name__} has no gradient checkpointing (diffusers and timm models have it); "
                        "run without --gradient-checkpointing")
