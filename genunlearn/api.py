"""The library entry point: ``unlearn(task, split, method, **settings)``."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from genunlearn.data.split import ForgetSplit
from genunlearn.distributed import make_accelerator
from genunlearn.job import method_config
from genunlearn.methods.registry import UnlearnResult
from genunlearn.tasks.classifier import ClassifierTask


def unlearn(
    task: ClassifierTask,
    split: ForgetSplit,
    method: str = "sfron",
    *,
    accelerator: Accelerator | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    **settings,
) -> UnlearnResult:
    """Make a copy of ``task.model`` forget ``split.forget`` with ``method``; ``task.model`` is not modified.

    ``settings`` override the method's config fields (e.g. ``steps=50, lr=0.01``) after the preset's defaults.
    """
    spec, cfg = method_config(method, task.preset, settings)
    return spec.run(
        task,
        split,
        cfg,
        accelerator or make_accelerator(),
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        resume=resume,
    )
