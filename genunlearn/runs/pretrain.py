"""The pretrain stage (``genunlearn pretrain``): train a preset once on its data (cached), report one quality figure,
and optionally write it to a folder."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.kinds import kind_of
from genunlearn.models.presets import get_preset
from genunlearn.storage.cache import writable_cache_root
from genunlearn.storage.lock import main_process_lock


def run_pretrain(model: str, *, data: str | None = None, cache_dir: str | None = None, output_dir: Path | None = None) -> str:
    """Pretrain (or load from the cache) ``model``; write it to ``output_dir`` (a new folder) from the main process;
    return a one-line summary (classifiers: test accuracy; generators: how often the judge recognises each class)."""
    accelerator = make_accelerator()
    preset = get_preset(model)
    kind = kind_of(preset)
    writable_cache_root(cache_dir)
    with main_process_lock(output_dir, accelerator) if output_dir is not None else nullcontext():
        if output_dir is not None and output_dir.exists() and any(output_dir.iterdir()):
            raise UserError(f"{output_dir} is not empty; choose a new --output-dir")
        task = kind.load_task(preset, pretrained=None, data=data, cache_dir=cache_dir, accelerator=accelerator)
        summary, save = kind.pretrain_summary(task, data=data, cache_dir=cache_dir, accelerator=accelerator)
        if accelerator.is_main_process and output_dir is not None:
            save(output_dir)
        accelerator.wait_for_everyone()
    return f"{task.name}: {summary}"
