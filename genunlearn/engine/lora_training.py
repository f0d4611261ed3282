"""Training LoRA adapters instead of full weights (peft, the library diffusers loads LoRAs with): rank-r factors B·A
injected into the Linear and Conv2d layers of a parameter scope, only they train, and the result is the original
with each layer's scaled B·A merged into its weight, a plain model of the original's architecture.

Which layers: a parameter scope's (ESD, finetune, gradient ascent, random labels), or for SalUn and SFR-on the mask's
modules (``mask_modules``): their masks select single weights, and a LoRA's B·A changes every weight of its layer, so
the mask acts at module level, choosing the layers its selection concentrates in, rather than on a merged delta (a
masked B·A is no longer rank r, so it would not export or load as the LoRA it was trained as)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from genunlearn.errors import UserError

ADAPTER = "default"  # peft's adapter name


def lora_target_modules(task, model: nn.Module, scope: str) -> list[str]:
    """The names of ``model``'s Linear and Conv2d layers whose weight is in the parameter ``scope``
    (``task.trainable_parameters``)."""
    chosen = {name for name, _ in task.trainable_parameters(model, scope)}
    targets = [name for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in chosen]
    if not targets:
        raise UserError(f"the parameter scope {scope!r} holds no Linear or Conv2d layer for a LoRA; choose another "
                        "lora_targets")
    return targets


def mask_modules(model: nn.Module, mask) -> list[str]:
    """The Linear and Conv2d layers of ``model`` whose weight keeps at least the mask's overall share of weights
    (``mask``: a ``ParameterMask`` over ``model``'s parameters): where a saliency mask concentrates."""
    keep = dict(zip(mask.names, mask.keep))
    overall = mask.kept_fraction()
    chosen = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))
              and f"{name}.weight" in keep and keep[f"{name}.weight"].float().mean().item() >= overall > 0]
    if not chosen:
        raise UserError("the mask keeps no weight of any Linear or Conv2d layer, so no layer takes LoRA factors; "
                        "loosen the mask (mask_threshold / mask_fraction) or train full weights")
    return chosen


def with_lora(model: nn.Module, targets: list[str], rank: int, seed: int) -> nn.Module:
    """``model`` with rank-``rank`` LoRA factors (α = rank: scale 1) injected into the ``targets`` layers, A drawn
    from ``seed`` (peft's Kaiming init), B zero so the model starts as it was; only the factors train."""
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merged_lora(trained: nn.Module, original: nn.Module) -> nn.Module:
    """A copy of ``original`` (same architecture, no adapters) whose adapted layers hold W + scale · B·A from
    ``trained``'s factors; every other parameter is ``original``'s."""
    merged = copy.deepcopy(original)
    for name, module in trained.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            target = merged.get_submodule(name)
            delta = module.get_delta_weight(ADAPTER)
            target.weight += delta.to(target.weight.device, target.weight.dtype)
    return merged
