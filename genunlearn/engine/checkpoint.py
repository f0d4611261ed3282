"""Periodic checkpoints of a loop: model (safetensors), optimizer (``weights_only`` torch file), loop state (JSON).

We write these ourselves instead of ``accelerator.save_state``: its ``load_state`` unpickles RNG
states with ``weights_only=False``, and our randomness is a function of (seed, step), so the
model, the optimizer and the step are all a resume needs.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genunlearn.engine.sharded_checkpoint import check_shards_match, load_sharded
from genunlearn.errors import UserError
from genunlearn.storage.files import make_staging_dir, nonfinite_entries, publish_staging

CHECKPOINT_PREFIX = "checkpoint-"  # diffusers' and accelerate's name: checkpoint-<step>
KEEP_CHECKPOINTS = 2
LOGGER = logging.getLogger("genunlearn")


class NonFiniteCheckpoint(ValueError):
    """A checkpoint whose weights or buffers hold NaN or inf (written before genunlearn checked buffers)."""


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder ``.../checkpoint-<step>`` was written at."""
    return int(Path(path).name.removeprefix(CHECKPOINT_PREFIX))


def checkpoint_folders(directory: Path) -> list[Path]:
    """The folders named like checkpoints under ``directory``, oldest (lowest step) first."""
    folders = (p for p in Path(directory).glob(f"{CHECKPOINT_PREFIX}*") if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit())
    return sorted(folders, key=checkpoint_step)


def checkpoint_path(directory: Path, step: int) -> Path:
    """``directory/checkpoint-<step>``."""
    return Path(directory) / f"{CHECKPOINT_PREFIX}{step}"


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints under ``directory``. Main process only."""
    for old in checkpoint_folders(directory)[:-keep]:
        shutil.rmtree(old)


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loop_state: dict,
                    keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write ``directory/checkpoint-<step>`` atomically and keep only the newest ``keep``. Main process only."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory, "incomplete")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "loop_state.json").write_text(json.dumps({"step": step, **loop_state}))
    final = checkpoint_path(directory, step)
    publish_staging(staging, final)
    prune_checkpoints(directory, keep)
    return final


def check_checkpoint_space(directory: Path, model: nn.Module, optimizer_copies: int, keep: int) -> None:
    """A UserError before the loop when the disk under ``directory`` has less free space than ``keep`` + 1
    checkpoints (the model's state and ``optimizer_copies`` optimizer tensors per parameter; one more is staged while
    the oldest is still kept) and the published model take."""
    state = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    optimizer = optimizer_copies * sum(p.numel() * p.element_size() for p in model.parameters())
    needed = (state + optimizer) * (keep + 1) + state
    existing = next(p for p in (Path(directory).resolve(), *Path(directory).resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"checkpoints and the model need about {needed / 2**20:.0f} MiB in {directory} and {free / 2**20:.0f} MiB are "
                        "free; free disk space, lower --checkpoints-total-limit, or turn checkpoints off with "
                        "--checkpoint-every 0")


def checkpoints_newest_first(directory: Path) -> list[Path]:
    """The complete checkpoints under ``directory``, newest first."""
    return [p for p in reversed(checkpoint_folders(directory)) if (p / "loop_state.json").is_file()]


def load_checkpoint(path: Path, shard: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(model state, optimizer state, loop state)`` from a checkpoint directory, loaded without unpickling code;
    ``shard=(rank, world)``: a sharded checkpoint's shards for this process (``engine.sharded_checkpoint``). A
    UserError when the checkpoint was written under another sharding."""
    loop_state = json.loads((path / "loop_state.json").read_text())
    check_shards_match(path, loop_state, shard)
    if shard is not None:
        model_state, optimizer_state = load_sharded(path, *shard)
    else:
        model_state = load_file(str(path / "model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    bad = nonfinite_entries(model_state)
    if bad:
        raise NonFiniteCheckpoint(f"non-finite values in {', '.join(bad[:3])}")
    return model_state, optimizer_state, loop_state


def load_latest_checkpoint(directory: Path, shard: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
    """``load_checkpoint`` of the newest checkpoint that loads; one that does not (truncated, corrupt) is skipped with a
    warning naming it (``genunlearn``'s logger: the console and ``run.log``). None when there is none."""
    for path in checkpoints_newest_first(directory):
        try:
            return load_checkpoint(path, shard)
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            LOGGER.warning("warning: checkpoint %s %s; resuming from the one before it", path,
                           _reason(exc))  # on the console and in run.log
    return None


def load_checkpoint_at(path: Path, shard: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``load_checkpoint`` of the checkpoint folder ``path``; a UserError when it is not one or does not load."""
    if not (Path(path) / "loop_state.json").is_file():
        raise UserError(f"{path} is not a checkpoint (no loop_state.json); pass latest or a folder from the run's checkpoints/")
    try:
        return load_checkpoint(Path(path), shard)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"checkpoint {path} {_reason(exc)}; resume from another one") from None


def _reason(exc: Exception) -> str:
    """Why a checkpoint cannot be resumed, after its path: ``is unreadable (EOFError)``, ``holds non-finite ...``."""
    return f"holds {exc}" if isinstance(exc, NonFiniteCheckpoint) else f"is unreadable ({type(exc).__name__})"


def check_resumable(checkpoint: Path, steps: int) -> None:
    """A UserError when ``checkpoint`` (a checkpoint folder, or a folder of them: the newest readable) is already at or
    past ``steps``."""
    candidates = [checkpoint] if (checkpoint / "loop_state.json").is_file() else checkpoints_newest_first(checkpoint)
    for path in candidates:
        try:
            done = json.loads((path / "loop_state.json").read_text())["step"]
        except (json.JSONDecodeError, KeyError, OSError):
            continue
        if done >= steps:
            raise UserError(f"the checkpoint is at step {done}; resume with more than {done} steps")
        return
