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
from genunlearn.engine.lora_training import lora_target_modules, merged_lora, trainable_count, with_lora
from genunlearn.engine.sharding import fsdp_requested, shard_model, sharding_requested
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
    lora_modules: list[str] | None = None,
) -> UnlearnResult:
    """Run ``step_fn`` on ``model`` (None: ``working_copy(task)``, with LoRA factors when ``cfg.lora_rank``; the
    original is never modified, and waits on the CPU with ``cfg.offload_frozen``); ``info`` goes into the result, with
    ``sharded_over`` (processes) for a sharded run, whose result is a gathered copy, and ``lora`` for a LoRA run, whose
    result is the original with the factors merged; ``lora_modules``: the layers that take them (a mask's,
    ``mask_modules``), instead of ``cfg.lora_targets``' scope)."""
    lora_rank = getattr(cfg, "lora_rank", None)
    if lora_rank is not None:
        model, lora_info = lora_working_copy(task, cfg, accelerator, lora_modules)
        info = {**(info or {}), "lora": lora_info}
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
    final = result.model if lora_rank is None else merged_lora(result.model, task.model)
    return UnlearnResult(final, result.log, result.steps, result.wall_time_s, {**(info or {}), **result.sharding_info()})


def working_copy(task: Task, accelerator: Accelerator) -> nn.Module:
    """The copy of ``task.model`` a method trains, on the accelerator's device: sharded across the processes when the
    launch asks for FSDP2 (``engine.sharding``), whole otherwise."""
    model = copy.deepcopy(task.model)
    return shard_model(model, accelerator) if sharding_requested(accelerator) else model.to(accelerator.device)


def lora_working_copy(task: Task, cfg: LoopConfig, accelerator: Accelerator,
                      modules: list[str] | None = None) -> tuple[nn.Module, dict]:
    """``(working copy with rank-``cfg.lora_rank`` LoRA factors in ``modules``, else the Linear and Conv2d layers of
    ``cfg.lora_targets`` (None: the method's ``scope``, else all), the report's record of them)``; not under FSDP."""
    if sharding_requested(accelerator) and fsdp_requested(accelerator):
        raise UserError("LoRA training does not run sharded (FSDP); its factors are small: launch it with DDP "
                        "(configs/accelerate/multi_gpu.yaml)")
    scope = "the mask's modules" if modules else cfg.lora_targets or getattr(cfg, "scope", "all")
    model = copy.deepcopy(task.model).to(accelerator.device)
    targets = modules or lora_target_modules(task, model, scope)
    model = with_lora(model, targets, cfg.lora_rank, cfg.seed)
    return model, {"rank": cfg.lora_rank, "targets": scope, "layers": len(targets),
                   "trainable_parameters": trainable_count(model),
                   "full_parameters": sum(p.numel() for p in task.model.parameters())}


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


def require_text_to_image(task: Task, method: str) -> None:
    """A one-line UserError unless ``task`` is text-to-image (it has a prompt table): ``method`` erases prompts."""
    if not hasattr(task, "prompt_embeddings"):
        raise UserError(f"{method} erases prompts from text-to-image models; {task.name} is not one")
