"""Saving and loading weights safely (safetensors, or ``torch.load(weights_only=True)``), atomically."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genunlearn.errors import UserError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain write would (mode & ~umask):
    safetensors and ``mkstemp`` create files readable by their owner only."""
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~_umask())


def flush_to_disk(path: Path) -> None:
    """fsync ``path`` (a file, or every file in a folder) so that a rename after it never publishes torn contents."""
    path = Path(path)
    for item in path.rglob("*") if path.is_dir() else [path]:
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


def make_staging_dir(parent: Path, name: str) -> Path:
    """A fresh hidden folder in ``parent`` to build ``name`` in before renaming it into place."""
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    make_readable(staging)  # mkdtemp makes it private; give it the usual permissions
    return staging


def publish_staging(staging: Path, directory: Path) -> None:
    """Put the finished ``staging`` folder in ``directory``'s place: normal permissions, fsynced, then renamed over
    whatever ``directory`` held."""
    make_readable(staging)
    flush_to_disk(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)


def remove_stale_staging(path: Path) -> None:
    """Delete the staging folders ``make_staging_dir`` left beside ``path`` (a killed write); call it holding
    ``path``'s lock, so that no live writer's folder goes."""
    for staging in Path(path).parent.glob(f".{Path(path).name}.*"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)


def nonfinite_entries(state: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point entries of a state dict (parameters and buffers, e.g. BatchNorm statistics) holding NaN or
    inf."""
    return [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)  # a full disk leaves no half-written temporary file
        raise UserError(f"cannot write {path} ({exc.strerror}); free disk space or choose a writable location") from None
    make_readable(Path(handle.name))
    os.replace(handle.name, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` as a safetensors file at ``path``, atomically (built in a staging folder beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(path.parent, path.stem)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / path.name))
    make_readable(staging / path.name)
    flush_to_disk(staging / path.name)
    os.replace(staging / path.name, path)
    staging.rmdir()


def save_model_dir(model: nn.Module, config: dict, directory: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` atomically (built beside it, then renamed)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory.parent, directory.name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS_NAME))
    (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    publish_staging(staging, directory)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when the message is empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; check the path or drop --pretrained to pretrain locally")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"weights file {path} is corrupt or unreadable ({first_line(exc)[:80]}); delete it and re-create it") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} holds no state dict; save it with model.state_dict()")
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load weights into ``model`` strictly from a weights file or a folder holding ``model.safetensors``;
    a shape or key mismatch is a UserError."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = lines[1].strip() if len(lines) > 1 else first_line(exc)
        raise UserError(f"weights in {path} do not fit this model ({first[:300]}); pass weights of the same architecture, "
                        "input channels and classes (a model trained at other settings: pass its timm folder, e.g. from "
                        "save_classifier, or a preset YAML with its channels and image_size)") from None
    if nonfinite_entries(state):
        raise UserError(f"weights in {path} hold NaN or infinite values; pass the weights of a trained model")


def _moved_aside(path: Path, exc: BaseException) -> None:
    aside = path.with_name(f"{path.name}.corrupt")
    os.replace(path, aside)
    warnings.warn(f"the cache file {path} is unreadable ({type(exc).__name__}); moved it to {aside} and computing it "
                  "again", stacklevel=3)


def read_cached_tensors(path: Path | None, accelerator: Accelerator) -> dict[str, torch.Tensor] | None:
    """The tensors of the cache file ``path`` on every process, or None when there is none (``path`` None or no such
    file). The main process decides for all: a file it cannot read is moved aside (``.corrupt``) with a warning
    naming it, and the caller computes it again."""
    stored, hit = None, [False]
    if path is not None and accelerator.is_main_process and path.is_file():
        try:
            stored = load_file(str(path))
            hit = [True]
        except (SafetensorError, OSError, ValueError) as exc:
            _moved_aside(path, exc)
    broadcast_object_list(hit)
    if not hit[0]:
        return None
    return stored if accelerator.is_main_process else load_file(str(path))


def read_cached_json(path: Path, accelerator: Accelerator):
    """``read_cached_tensors`` for a JSON cache file: its value on every process, or None."""
    value = [None]
    if accelerator.is_main_process and path.is_file():
        try:
            value = [json.loads(path.read_text())]
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            _moved_aside(path, exc)
    broadcast_object_list(value)
    return value[0]
