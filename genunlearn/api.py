"""The library entry points: ``forget_split(task, classes=...)``, ``unlearn(task, split, method, **settings)``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from accelerate import Accelerator

from genunlearn.data.class_names import class_ids
from genunlearn.data.split import ForgetSplit, choose_split, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.methods.registry import UnlearnResult, method_config
from genunlearn.progress import library_console
from genunlearn.tasks.base import Task


def forget_split(task: Task, classes: Sequence[int | str] = (), *, fraction: float | None = None,
                 subclasses: Sequence[int | str] = (), seed: int = 0) -> ForgetSplit:
    """What ``task`` forgets, as a split of its own data: whole ``classes`` (ids or names in ``task.train_data.classes``),
    a random ``fraction`` of its training samples (chosen by ``seed``), or ``subclasses`` of a super-class dataset.
    A ``TypeError`` for a task given by name or for classes given as one string instead of a list."""
    check_task(task, "forget_split")
    for name, ids in (("classes", classes), ("subclasses", subclasses)):
        if isinstance(ids, (str, bytes)) or not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in ids):
            raise TypeError(f"forget_split: {name} must be a list of class ids or names, e.g. {name}=[3]; got {ids!r}")
    classes = class_ids(classes, task.train_data.classes)
    subclasses = class_ids(subclasses, task.train_data.subclasses, "sub-class")
    spec = choose_split(classes, fraction, subclasses, seed)
    return make_forget_split(task.train_data, task.test_data, spec)


def check_task(task: Task, caller: str) -> None:
    """A TypeError naming the fix when ``task`` is not a task (e.g. a preset's name)."""
    if not all(hasattr(task, name) for name in ("model", "train_data", "test_data", "loss")):  # Task is a protocol
        hint = f" (load it first: genunlearn.load_task({task!r}))" if isinstance(task, str) else ""
        raise TypeError(f"{caller}: task must be a genunlearn Task, got {type(task).__name__}{hint}")


def check_split(task: Task, split: ForgetSplit) -> None:
    """A TypeError unless ``split`` is a ``ForgetSplit``; a UserError unless it was built from ``task``'s own
    training and test sets."""
    if not isinstance(split, ForgetSplit):
        raise TypeError(f"unlearn: split must be a ForgetSplit from genunlearn.forget_split(task, ...), got {type(split).__name__}")
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
    built from a user's model: the method's reference defaults). A ``TypeError`` for a task given by name or a split
    that is not a ``ForgetSplit``."""
    check_task(task, "unlearn")
    check_split(task, split)
    library_console()  # progress in a notebook or a log file too, unless the caller configured logging
    spec, cfg = method_config(method, task.preset, settings)
    accelerator = accelerator or make_accelerator()
    spec.check_shards(accelerator)
    return spec.run(
        task,
        split,
        cfg,
        accelerator,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        resume=resume,
    )
