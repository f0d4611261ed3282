"""The model cache: where it lives (``--cache-dir``, else ``$GENUNLEARN_CACHE``, else the user cache dir), and entries
built once, under a lock, then loaded (pretrained presets, retrain oracles)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from genunlearn.errors import UserError
from genunlearn.storage.files import remove_stale_staging
from genunlearn.storage.lock import main_process_lock

CACHE_ENV = "GENUNLEARN_CACHE"
Loaded = TypeVar("Loaded")
PRETRAIN_SEED = 0


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genunlearn"


def writable_cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_root(cache_dir)``, checked before any work: it must be (or become) a folder this process can write."""
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        raise UserError(f"the model cache {root} is not writable ({exc.strerror}); pass --cache-dir or set "
                        f"{CACHE_ENV} to a writable folder") from None
    return root


def pretrained_entry(root: Path, preset, data_id: str, seed: int, numerics: str) -> Path:
    """The cache folder of ``preset`` pretrained on ``data_id`` with ``seed`` under ``numerics`` (device type,
    precision, draws: ``genunlearn.precision.numerics_tag``); it changes when the recipe does."""
    return root / "models" / f"{preset.name}-{preset.fingerprint()}-{data_id}-seed{seed}-{numerics}"


def pretrain_once(entry: Path, marker: str, pretrain_and_save: Callable[[], None], accelerator: Accelerator, what: str) -> None:
    """Unless ``entry/marker`` exists, run ``pretrain_and_save`` on every process (it writes ``entry`` from the
    main one) and wait for it. The main process decides for all, holding ``entry``'s lock: a job that is filling the
    same entry is waited for, and its result used."""
    with main_process_lock(entry, accelerator, wait=True):
        if accelerator.is_main_process:
            remove_stale_staging(entry)
        cached = [(entry / marker).is_file()]
        broadcast_object_list(cached)
        if cached[0]:
            return
        if accelerator.is_main_process:
            print(f"pretraining {what} (first use; cached in {entry})", flush=True)
        pretrain_and_save()
        accelerator.wait_for_everyone()


def cached_or_built(entry: Path, marker: str, build_and_save: Callable[[], None], load: Callable[[Path], Loaded],
                    accelerator: Accelerator, what: str) -> Loaded:
    """``load(entry)`` once ``entry`` holds ``what``: built now by ``build_and_save`` unless ``entry/marker`` exists
    (``pretrain_once``). Pretrained presets and retrain oracles alike are cached this way; an entry that fails to
    load is a UserError naming the folder to delete."""
    pretrain_once(entry, marker, build_and_save, accelerator, what)
    try:
        return load(entry)
    except (UserError, OSError, ValueError, RuntimeError):
        raise UserError(f"the cache entry {entry} ({what}) is corrupt; delete that folder to build it again") from None
