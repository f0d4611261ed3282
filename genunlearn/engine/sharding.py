"""Sharded training (FSDP2): each process holds 1/N of the trained weights, their gradients, the optimizer state, the
Fishers and the masks.

Asked for through accelerate: ``accelerate launch --use_fsdp --fsdp_version 2`` or ``--config_file
configs/accelerate/fsdp.yaml`` (in Python, an ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))``).
genunlearn then applies ``torch.distributed.fsdp.fully_shard`` itself rather than through ``accelerator.prepare``:
accelerate sets up no FSDP on a CPU (gloo) launch, and the gradient statistics run on the sharded model before the loop
prepares anything, so one code path serves CPUs and GPUs. Units: the blocks the model names in ``_no_split_modules``
(diffusers' own list), else each element of its top-level ModuleLists and Sequentials; then the root.

Every trained parameter is then a DTensor sharded on dim 0. After backward its gradient is reduce-scattered (the mean
over processes, each holding its share of the global batch), *before* anything squares it; element-wise work runs on
``local`` shards. The frozen original (``task.model``) stays whole on every process.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import weakref

import torch
from accelerate import Accelerator
from torch import nn

from genunlearn.errors import UserError

# blocks a model's own forward reaches into before their turn (DiT embeds the timestep and label with block 0's
# norm1.emb): they stay in the root's unit, gathered whenever the root's parameters are
_CALLED_BY_ROOT = {"DiTTransformer2DModel": ("transformer_blocks.0",)}
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()  # sharded -> meta copy


def fsdp_requested(accelerator: Accelerator) -> bool:
    """Whether the launch asks for FSDP (accelerate's plugin, or ``accelerate launch --use_fsdp``); a UserError for FSDP
    version 1 or fp16 (a loss scaler over DTensor gradients is not supported: use bf16)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return False
    version = int(plugin.fsdp_version if plugin is not None else os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise UserError(f"FSDP version {version} is not supported; launch with --fsdp_version 2 "
                        "(or --config_file configs/accelerate/fsdp.yaml)")
    if accelerator.mixed_precision == "fp16":
        raise UserError("sharded runs compute in fp32 or bf16; pass --mixed-precision bf16 instead of fp16")
    return True


def sharding_requested(accelerator: Accelerator) -> bool:
    """Whether the launch asks for FSDP over more than one process (one process has nothing to shard)."""
    return fsdp_requested(accelerator) and accelerator.num_processes > 1


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writes reach the parameter), or ``tensor`` itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sum_over_processes(value: torch.Tensor, sharded: bool) -> torch.Tensor:
    """``value`` summed over the processes when ``sharded`` (in place), else ``value``."""
    if sharded:
        torch.distributed.all_reduce(value)
    return value


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units before the root, children before their parents (see the module docstring)."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    kept_in_root = {model.get_submodule(name) for name in _CALLED_BY_ROOT.get(type(model).__name__, ())}
    if block_names:  # innermost first: fully_shard takes a unit's children before the unit
        units = [m for m in reversed(list(model.modules())) if type(m).__name__ in block_names and m is not model]
    else:
        lists = (c for c in model.children() if isinstance(c, (nn.ModuleList, nn.Sequential)))
        units = [m for container in lists for m in container.children() if any(True for _ in m.parameters())]
    return [m for m in units if m not in kept_in_root]


def shard_model(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """``model`` (modified in place) on the accelerator's device, each unit and the root ``fully_shard``-ed across the
    launch's processes; ``gathered_copy`` later rebuilds a plain module from it."""
    from torch.distributed.fsdp import fully_shard

    skeleton = _meta_skeleton(model)
    model.to(accelerator.device)
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    _SKELETONS[model] = skeleton
    return model


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory), ties kept."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def gathered_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded) copy of the sharded ``model`` on its device, on every process: gathered one tensor at a time,
    so no process holds more than its shards, this copy and one tensor in flight. Collective: every process calls it."""
    device = next(local(p) for p in model.parameters()).device
    plain = copy.deepcopy(_SKELETONS[model]).to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            plain.get_parameter(name).copy_(param.full_tensor() if hasattr(param, "full_tensor") else param)
        for name, buffer in model.named_buffers():
            plain.get_buffer(name).copy_(buffer)
    return plain.train(model.training)


def sharding_record(processes: int | None) -> dict:
    """What a report's ``method_info`` says about sharding: ``sharded_over`` (processes) and ``evaluated_on``; {} for
    a whole model (``processes`` None)."""
    return {"sharded_over": processes, "evaluated_on": "gathered copy"} if processes else {}


def clip_sharded_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over DTensor gradients: the norm of the whole gradient (every shard), the same on every
    process; returns it before clipping."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for grad in grads:
        squares += grad.float().pow(2).sum()
    norm = float(sum_over_processes(squares, True).sqrt())
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0 and grads and math.isfinite(norm):
        torch._foreach_mul_(grads, coefficient)
    return norm
