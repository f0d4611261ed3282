"""The library entry points: ``forget_split(task, classes=...)``, ``unlearn(task, split, method, **settings)``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from accelerate import Accelerator

from genunlearn.data.split import ForgetSplit, choose_split, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.methods.registry import UnlearnResult, method_config
from genunlearn.tasks.base import Task


def forget_split(task: Task, classes: Sequence[int] = (), *, fraction: float | None = None, subclasses: Sequence[int] = (),
                 seed: int = 0) -> ForgetSplit:
    """What ``task`` forgets, as a split of its own data: whole ``classes``, a random ``fraction`` of its training
    samples (chosen by ``seed``), or ``subclasses`` of a super-class dataset."""
    spec = choose_split(classes, fraction, subclasses, seed)
    return make_forget_split(task.train_data, task.test_data, spec)


def check_split(task: Task, split: ForgetSplit) -> None:
    """A UserError unless ``split`` was built from ``task``'s own training and test sets."""
    if split.train is not task.train_data or split.test is not task.test_data:
        raise UserError("the split was made from other data than the task's; build it with genunlearn.forget_split(task, ...)")


def unlearn(
    task: Task,
    split: ForgetSplit,
    method: str = "sfron",
    *,
    accelerator: Accelerator | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    **settings,
) -> UnlearnResult:
    """Make a copy of ``task.model`` forget ``split.forget`` with ``method``; ``task.model`` is not modified.

    ``settings`` override the method's config fields (e.g. ``steps=50, lr=0.01``) after the preset's defaults (a task
    built from a user's model: the method's reference defaults)."""
    check_split(task, split)
    spec, cfg = method_config(method, task.preset, settings)
    return spec.run(
        task,
        split,
        cfg,
        accelerator or make_accelerator(),
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        resume=resume,
    )
