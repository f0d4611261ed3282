"""Running a step function on a copy of the task's model: the body every loop-based method shares."""

from __future__ import annotations

import copy
from pathlib import Path

from accelerate import Accelerator

from genunlearn.data.split import ForgetSplit
from genunlearn.errors import UserError
from genunlearn.engine.loop import LoopConfig, StepFn, run_loop
from genunlearn.methods.registry import UnlearnResult
from genunlearn.tasks.base import Task


def unlearn_with_loop(
    task: Task,
    split: ForgetSplit,
    cfg: LoopConfig,
    accelerator: Accelerator,
    step_fn: StepFn,
    *,
    checkpoint_dir: Path | None,
    resume: bool | Path,
    uses_forget: bool = True,
    uses_retain: bool = True,
    info: dict | None = None,
) -> UnlearnResult:
    """Run ``step_fn`` on a deep copy of ``task.model`` (the original is never modified); ``info`` goes into the result."""
    result = run_loop(
        copy.deepcopy(task.model),
        task,
        step_fn,
        cfg,
        accelerator,
        forget_data=split.forget if uses_forget else None,
        retain_data=split.retain if uses_retain else None,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    return UnlearnResult(result.model, result.log, result.steps, result.wall_time_s, info or {})


def require_classifier(task: Task, method: str) -> None:
    """A one-line UserError unless ``task`` is a classifier (it has ``logits``): ``method`` needs class predictions."""
    if not hasattr(task, "logits"):
        raise UserError(f"{method} applies to classifiers; {task.name} is not one")
