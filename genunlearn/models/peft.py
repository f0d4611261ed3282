"""Parameter scopes and parameter-efficient training (PEFT): train only a scope on a frozen backbone.

Scopes: ``all``, ``batchnorm`` (BatchNorm affine weights and biases), ``prompts`` (a timm ViT's learnable
prompt tokens, ``reg_token``), ``head`` (the classifier), joined with ``+`` (e.g. ``batchnorm+head``).
A PEFT model's backbone is the architecture's seeded random initialisation (``BACKBONE_SEED``; it saw no data)
and its scope starts from fixed values (BatchNorm γ = 1, β = 0, prompts and head 0), so a retrain on D_r
starts from the same point and the scope's initial values are known (Fast-NTK's trapezium scale needs them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from genunlearn.errors import UserError

BACKBONE_SEED = 20_240_601
PARTS = ("all", "batchnorm", "prompts", "head")


def _part(model: nn.Module, part: str) -> list[tuple[str, nn.Parameter]]:
    if part == "all":
        return list(model.named_parameters())
    if part == "batchnorm":
        return [(f"{name}.{kind}", param) for name, module in model.named_modules() if isinstance(module, _BatchNorm)
                for kind, param in module.named_parameters(recurse=False)]
    if part == "prompts":
        if getattr(model, "reg_token", None) is None:
            raise UserError("the prompts scope needs a timm VisionTransformer with prompt tokens (model_args: reg_tokens: P)")
        return [("reg_token", model.reg_token)]
    if part == "head":
        head_ids = {id(p) for p in classifier_head(model).parameters()}
        return [(n, p) for n, p in model.named_parameters() if id(p) in head_ids]
    raise UserError(f"unknown parameter scope {part!r}; use {', '.join(PARTS)} or a +-joined combination")


def classifier_head(model: nn.Module) -> nn.Module:
    """The layer that produces the logits: timm's ``get_classifier()``, else the model's last ``nn.Linear``."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    heads = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise UserError(f"{type(model).__name__} has no linear head; the head scope needs one (or a timm model)")
    return heads[-1]


def scope_parameters(model: nn.Module, scope: str) -> list[tuple[str, nn.Parameter]]:
    """Named parameters of ``scope`` (parts joined by ``+``), in model order, without repeats."""
    chosen = {id(param) for part in scope.split("+") for _, param in _part(model, part)}
    named = [(name, param) for name, param in model.named_parameters() if id(param) in chosen]
    if not named:
        raise UserError(f"scope {scope!r} holds no parameters in {type(model).__name__}")
    return named


def scope_initial_values(model: nn.Module, scope: str) -> list[torch.Tensor]:
    """The values PEFT training starts the scope from: BatchNorm weights 1, everything else 0."""
    batchnorm_weights = {id(module.weight) for module in model.modules() if isinstance(module, _BatchNorm) and module.weight is not None}
    return [torch.ones_like(p) if id(p) in batchnorm_weights else torch.zeros_like(p) for _, p in scope_parameters(model, scope)]


def prepare_peft(model: nn.Module, scope: str) -> nn.Module:
    """Reset ``scope`` to its initial values and freeze every other parameter (in place; returns ``model``)."""
    trainable = scope_parameters(model, scope)
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        for (_, param), value in zip(trainable, scope_initial_values(model, scope)):
            param.copy_(value)
            param.requires_grad_(True)
    return model
