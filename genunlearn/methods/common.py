"""Running a step function on a copy of the task's model: the body every loop-based method shares."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from torch import nn

from genunlearn.data.split import ForgetSplit
from genunlearn.errors import UserError
from genunlearn.engine.loop import LoopConfig, StepFn, run_loop
from genunlearn.engine.sharding import shard_model, sharding_requested
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
    model: nn.Module | None = None,
) -> UnlearnResult:
    """Run ``step_fn`` on ``model`` (None: ``working_copy(task)``; the original is never modified, and waits on the CPU
    with ``cfg.offload_frozen``); ``info`` goes into the result, with ``sharded_over`` (processes) for a sharded run,
    whose result is a gathered copy."""
    model = model if model is not None else working_copy(task, accelerator)
    with original_offloaded(task, cfg.offload_frozen):
        result = run_loop(
            model,
            task,
            step_fn,
            cfg,
            accelerator,
            forget_data=split.forget if uses_forget else None,
            retain_data=split.retain if uses_retain else None,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
        )
    return UnlearnResult(result.model, result.log, result.steps, result.wall_time_s, {**(info or {}), **result.sharding_info()})


def working_copy(task: Task, accelerator: Accelerator) -> nn.Module:
    """The copy of ``task.model`` a method trains, on the accelerator's device: sharded across the processes when the
    launch asks for FSDP2 (``engine.sharding``), whole otherwise."""
    model = copy.deepcopy(task.model)
    return shard_model(model, accelerator) if sharding_requested(accelerator) else model.to(accelerator.device)


@contextmanager
def original_offloaded(task: Task, offload: bool) -> Iterator[None]:
    """``task.model``, the frozen original, on the CPU inside the block when ``offload`` (only the trained copy then
    holds device memory), back on its device after."""
    if not offload:
        yield
        return
    device = next(task.model.parameters()).device
    task.model.to("cpu")
    try:
        yield
    finally:
        task.model.to(device)


def frozen_copy(task: Task, accelerator: Accelerator, offload: bool) -> nn.Module:
    """A frozen (eval, no gradients) copy of ``task.model`` for a teacher's predictions: on the device, or with
    ``offload`` kept on the CPU with each layer moved to the device for its forward (``accelerate.cpu_offload``)."""
    teacher = copy.deepcopy(task.model).eval().requires_grad_(False)
    if offload:
        from accelerate import cpu_offload

        return cpu_offload(teacher.cpu(), execution_device=accelerator.device)
    return teacher.to(accelerator.device)


def require_classifier(task: Task, method: str) -> None:
    """A one-line UserError unless ``task`` is a classifier (it has ``logits``): ``method`` needs class predictions."""
    if not hasattr(task, "logits"):
        raise UserError(f"{method} applies to classifiers; {task.name} is not one")
