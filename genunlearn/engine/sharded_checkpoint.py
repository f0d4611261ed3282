"""Checkpoints of a sharded loop (``engine.sharding``): every process writes its own shards of the weights and of the
optimizer state (safetensors), the main process the optimizer's settings and the loop state (JSON), into one staging
folder that is published whole; nothing is pickled (why not ``torch.distributed.checkpoint`` through accelerate: its
``.metadata`` file is a pickle, as ``accelerator.load_state``'s RNG files are, and we never unpickle).

A sharded checkpoint resumes under the same number of processes, sharded; any other launch is refused with the one
that resumes it (the shards' boundaries depend on the process count).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from genunlearn.engine.sharding import local
from genunlearn.errors import UserError
from genunlearn.storage.files import make_readable, publish_staging

SETTINGS_FILE = "optimizer_settings.json"


def shard_files(rank: int, world: int) -> tuple[str, str]:
    """The model and optimizer shard files of process ``rank`` of ``world``."""
    return f"model-shard-{rank:05d}-of-{world:05d}.safetensors", f"optimizer-shard-{rank:05d}-of-{world:05d}.safetensors"


def save_sharded_checkpoint(final: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loop_state: dict,
                            accelerator: Accelerator) -> None:
    """Write the checkpoint folder ``final`` from every process (collective); the main process publishes it. Older
    checkpoints are pruned by the caller."""
    rank, world = accelerator.process_index, accelerator.num_processes
    staging = final.with_name(f".incomplete-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        make_readable(staging)
    accelerator.wait_for_everyone()
    model_file, optimizer_file = shard_files(rank, world)
    save_file({k: local(v).detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(staging / model_file))
    tensors, settings = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(staging / optimizer_file))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / SETTINGS_FILE).write_text(json.dumps(settings))
        (staging / "loop_state.json").write_text(json.dumps({**loop_state, "shards": world}))
        publish_staging(staging, final)
    accelerator.wait_for_everyone()


def check_shards_match(path: Path, loop_state: dict, shard: tuple[int, int] | None) -> None:
    """A UserError when the checkpoint's sharding (``loop_state["shards"]``: process count, absent when unsharded)
    is not this launch's (``shard``: ``(rank, world)``, None unsharded)."""
    written = loop_state.get("shards")
    world = shard[1] if shard is not None else None
    if written == world:
        return
    if written is None:
        raise UserError(f"{path} was written by an unsharded run; resume it without --use_fsdp")
    raise UserError(f"{path} was written by {written} sharded processes; resume it with accelerate launch "
                    f"--use_fsdp --fsdp_version 2 --num_processes {written}")


def load_sharded(path: Path, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict]:
    """``(this process's model shards, its optimizer state in flattened form)`` from a sharded checkpoint."""
    model_file, optimizer_file = shard_files(rank, world)
    settings = json.loads((path / SETTINGS_FILE).read_text())
    return load_file(str(path / model_file)), {"tensors": load_file(str(path / optimizer_file)), "settings": settings}


def load_model_shards(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a shard file's tensors into the sharded ``model`` (its parameters' local shards and its buffers)."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            local(value).copy_(state[name])


def load_optimizer_shards(optimizer: torch.optim.Optimizer, flattened: dict, params: list[nn.Parameter]) -> None:
    """Load a shard file's optimizer state into ``optimizer`` built over the sharded ``params``."""
    from torch.distributed.tensor import DTensor

    state: dict[int, dict] = {}
    for key, value in flattened["tensors"].items():
        index, name = key.split(".", 1)
        param = params[int(index)]
        if key in flattened["settings"]["sharded"]:
            value = DTensor.from_local(value.to(local(param).device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride(), run_check=False)
        state.setdefault(int(index), {})[name] = value
    for key in flattened["settings"]["none"]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = None
    optimizer.load_state_dict({"state": state, "param_groups": flattened["settings"]["param_groups"]})


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as ``({"<param index>.<name>": local tensor}, {"param_groups", "sharded": [keys],
    "none": [keys]})``."""
    tensors, sharded, none = {}, [], []
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            key = f"{index}.{name}"
            if value is None:  # SGD without momentum
                none.append(key)
                continue
            if hasattr(value, "to_local"):
                sharded.append(key)
            tensors[key] = local(value).detach().contiguous().cpu()
    return tensors, {"param_groups": state_dict["param_groups"], "sharded": sharded, "none": none}
