"""SSD's dampening step, element-wise on whole parameters or on this process's shards of a sharded model."""

from __future__ import annotations

import re

import torch
from torch import nn

from genunlearn.engine.sharding import local, sum_over_processes


@torch.no_grad()
def dampen(model: nn.Module, whole: list[torch.Tensor], forget: list[torch.Tensor], alpha: float, dampening: float,
           parameters: str | None = None) -> tuple[int, int]:
    """Scale every selected weight (I_f > α·I_D, strict) by β = min(λ·I_D / I_f, 1), in place; parameters whose
    name does not match ``parameters`` (a regex; None: all) are left alone. Importances are per parameter in
    ``model.parameters()`` order, shards of a sharded model's (collective then). Returns (selected, considered) counts
    over the whole model."""
    selected, considered, sharded = 0, 0, False
    for (name, param), importance_whole, importance_forget in zip(model.named_parameters(), whole, forget):
        if parameters is not None and re.search(parameters, name) is None:
            continue
        sharded = sharded or hasattr(param, "to_local")
        values = local(param)
        chosen = importance_forget > alpha * importance_whole
        beta = (dampening * importance_whole[chosen] / importance_forget[chosen]).clamp(max=1.0)
        values[chosen] = values[chosen] * beta.to(values.dtype)
        selected += int(chosen.sum())
        considered += param.numel()
    device = next(local(p) for p in model.parameters()).device
    return int(sum_over_processes(torch.tensor(selected, device=device), sharded)), considered
