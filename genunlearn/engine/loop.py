"""The one training/unlearning loop every gradient method configures.

A method supplies a *step function* that draws forget/retain batches from the context and
calls ``ctx.backward_step(loss)`` once or more; the loop owns the optimizer, the learning-rate
schedule, gradient clipping, the non-finite guard, accelerate's ``prepare``/``backward``, the
progress bar, logged figures and periodic checkpoints with resume.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from genunlearn.engine.batches import BatchStream
from genunlearn.engine.checkpoint import (
    check_checkpoint_space,
    checkpoint_path,
    checkpoints_newest_first,
    load_checkpoint_at,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from genunlearn.engine.masks import ParameterMask
from genunlearn.engine.sharded_checkpoint import load_model_shards, load_optimizer_shards, save_sharded_checkpoint
from genunlearn.engine.sharding import (clip_sharded_grad_norm, gathered_copy, is_sharded, local, shard_model,
                                       sharding_record, sharding_requested, sum_over_processes)
from genunlearn.errors import UserError
from genunlearn.noise import NoiseSource, current_noise, derive_seed, drawing_from
from genunlearn.progress import progress
from genunlearn.storage.files import nonfinite_entries
from genunlearn.tasks.base import Task

LOGGER = logging.getLogger("genunlearn")  # run.log and plain progress lines (genunlearn.runs.logs)
ESTIMATE_AFTER = 3  # iterations timed for the duration estimate
OPTIMIZERS = ("sgd", "adam", "adamw", "adamw8bit")  # adamw8bit: bitsandbytes' AdamW8bit (CUDA; moments in 8 bits)


@dataclass
class LoopConfig:
    """Optimisation settings shared by every loop-based method. ``batch_size`` is per process."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"
    clip_grad_norm: float | None = None
    hold_masked: bool = False  # masked-out entries keep their values exactly (else momentum and weight decay move them)
    shuffle: bool = True  # each pass over a set in a fresh seeded order (False: the set's own order, every pass)
    offload_frozen: bool = False  # frozen models (the original, ESD's teacher) wait on the CPU during the loop
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    rl_form: str = "eps_match"  # diffusion random-label form: eps_match (SalUn DDPM) or relabel (SFR-on DiT)
    rl_shift: int | None = None  # rl's other label: None a random other class per sample; k: (c + k) mod K for all
    lora_rank: int | None = None  # train rank-r LoRA factors instead of full weights (engine/lora_training.py)
    lora_targets: str | None = None  # the scope whose Linear/Conv2d layers get them (None: the method's scope, else all)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use {', '.join(OPTIMIZERS)}")
        if self.optimizer == "adamw8bit" and not torch.cuda.is_available():
            raise UserError("8-bit AdamW (bitsandbytes) runs on CUDA GPUs only; use optimizer=adamw on this machine")
        if self.schedule not in ("constant", "cosine"):
            raise UserError(f"unknown schedule {self.schedule!r}; use constant or cosine")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise UserError(f"log_every must be at least 1 and checkpoint_every at least 0 (0: no checkpoints), got "
                            f"{self.log_every} and {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise UserError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.rl_form not in ("eps_match", "relabel"):
            raise UserError(f"unknown rl_form {self.rl_form!r}; use eps_match or relabel")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise UserError(f"lora_rank must be at least 1 (or unset to train full weights), got {self.lora_rank}")
        if self.rl_shift is not None and self.rl_shift < 1:
            raise UserError(f"rl_shift must be at least 1 (or unset for random other classes), got {self.rl_shift}")

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based ``step``."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr


def make_optimizer(cfg: LoopConfig, params) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``; a UserError for 8-bit AdamW on a sharded model or without bitsandbytes."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        return _adamw_8bit(cfg, list(params))
    optimizer_class = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw_8bit(cfg: LoopConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if any(hasattr(p, "to_local") for p in params):
        raise UserError("8-bit AdamW does not take sharded (FSDP) parameters; use optimizer=adamw under --use_fsdp")
    if any(local(p).device.type != "cuda" for p in params):
        raise UserError("8-bit AdamW (bitsandbytes) runs on CUDA GPUs only; use optimizer=adamw on this device")
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class StepContext:
    """What a step function sees at one step."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    task: Task
    cfg: LoopConfig
    forget: BatchStream | None
    retain: BatchStream | None
    noise: NoiseSource | None = None  # this step's draws (``step_noise``; None outside run_loop: ``current_noise()``)

    def global_randint(self, high: int, local_size: int) -> torch.Tensor:
        """This process's ``local_size`` draws from ``[0, high)`` of this step's stream: the values a single process
        with the whole global batch would draw, so results do not depend on the process count."""
        return (self.noise or current_noise()).randint(high, (local_size,), self.accelerator.device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def clip_gradients(self, max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None: no clipping) and return the norm before clipping.

        The norm is taken after gradients are all-reduced (over every shard of a sharded model), so every process sees
        the same value and all stop together on a non-finite one.
        """
        if is_sharded(self.model):
            norm = clip_sharded_grad_norm(self.parameters(), max_norm or float("inf"))
        else:
            norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm or float("inf")))
        if not math.isfinite(norm):
            raise UserError(
                f"the loss became non-finite at step {self.step} (gradient norm {norm}); lower the learning rate "
                f"(--lr, now {self.cfg.lr}) or set a gradient clip; the last checkpoint is kept"
            )
        return norm

    def optimizer_step(self, frozen: ParameterMask | None = None) -> None:
        """Step the optimizer; with ``frozen``, its masked-out entries keep their values exactly."""
        if frozen is None:
            self.optimizer.step()
            return
        params = self.parameters()
        held = frozen.held_values(params)
        self.optimizer.step()
        frozen.restore_held(params, held)

    def backward_step(self, loss: torch.Tensor, *, mask: ParameterMask | None = None, max_norm: float | None = None,
                      clip_before_mask: bool = False) -> float:
        """Zero grads, backward, ``grad ⊙= mask``, clip, step.

        The mask acts on the gradient, as the references' ``p.grad *= mask`` does: the optimizer's momentum, Adam
        moments and weight decay still move masked-out entries; with ``cfg.hold_masked`` they keep their values
        exactly (SalUn's classifier reference restores them after every step). ``max_norm`` (None:
        ``cfg.clip_grad_norm``) bounds the gradient norm; returns the norm before clipping. ``clip_before_mask``
        clips the whole gradient and masks afterwards (SalUn's diffusion order).
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        max_norm = max_norm if max_norm is not None else self.cfg.clip_grad_norm
        if clip_before_mask:
            norm = self.clip_gradients(max_norm)
        if mask is not None:
            mask.mask_gradients(self.parameters())
        if not clip_before_mask:
            norm = self.clip_gradients(max_norm)
        self.optimizer_step(frozen=mask if self.cfg.hold_masked else None)
        return norm


StepFn = Callable[[StepContext], dict[str, float]]


def step_noise(seed: int, step: int, accelerator: Accelerator) -> NoiseSource:
    """Step ``step``'s draws (diffusion noise and timesteps, label dropout, rl's other labels): a CPU stream seeded by
    (seed, step) that draws for the global batch, so any process count and a resumed run see the same numbers. The
    device's own generator (dropout layers inside a model) is seeded per (seed, step, process) as well."""
    torch.manual_seed(derive_seed(seed, "loop device", step, accelerator.process_index))
    return NoiseSource(derive_seed(seed, "loop", step), rank=accelerator.process_index, world=accelerator.num_processes)


def training_mode(model: nn.Module, task: Task) -> nn.Module:
    """``model.train()``, except that a task with ``frozen_batchnorm`` keeps its BatchNorm layers in eval mode (running
    statistics used and never updated: the NTK reference's ``--disable-bn`` for PEFT fine-tuning). Returns ``model``."""
    model.train()
    if getattr(task, "frozen_batchnorm", False):
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
    return model


@dataclass
class LoopResult:
    """The trained model (unwrapped, on the accelerator's device; a sharded one gathered into a plain copy on every
    process), logged figures, steps run, wall time (s) and the processes it was sharded over (None: not sharded)."""

    model: nn.Module
    log: list[dict] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    sharded_over: int | None = None

    def sharding_info(self) -> dict:
        """``engine.sharding.sharding_record`` of this run."""
        return sharding_record(self.sharded_over)


def run_loop(
    model: nn.Module,
    task: Task,
    step_fn: StepFn,
    cfg: LoopConfig,
    accelerator: Accelerator,
    *,
    forget_data: Dataset | None = None,
    retain_data: Dataset | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool | Path = False,
    desc: str = "unlearning",
    observe: Callable[[int, nn.Module], None] | None = None,
) -> LoopResult:
    """Run ``cfg.steps`` steps of ``step_fn`` on ``model`` (modified in place) and return it with its log.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every`` > 0, a checkpoint is written every that many
    steps; ``resume=True`` continues from the newest one there, ``resume=PATH`` from that checkpoint (same config required). ``observe(step,
    model)`` runs on every process after each logged step but the last (e.g. to evaluate mid-run); it
    must leave the model as it found it (a sharded model's observer gets a gathered copy).

    A sharded ``model`` (``engine.sharding.shard_model``; under an FSDP launch any model is sharded here) trains without
    ``accelerator.prepare``: the same global batches and draws as DDP, gradients reduce-scattered, clipping over every
    shard, sharded checkpoints.
    """
    if not is_sharded(model) and sharding_requested(accelerator):  # under an FSDP launch every loop is sharded by us
        shard_model(model, accelerator)  # (relearning, the oracle, pretraining), never by accelerate's prepare
    sharded = is_sharded(model)
    shard = (accelerator.process_index, accelerator.num_processes) if sharded else None
    if not sharded:
        model.to(accelerator.device)  # as prepare would; an optimizer may check where its parameters are
    optimizer = make_optimizer(cfg, model.parameters())
    if checkpoint_dir is not None and cfg.checkpoint_every:  # every process alike, so all stop together
        written = min(cfg.keep_checkpoints, cfg.steps // cfg.checkpoint_every)  # kept at once, at most
        check_checkpoint_space(checkpoint_dir, model, 1 if cfg.optimizer == "sgd" else 2, written)
    start_step, log, wall_before, positions = 0, [], 0.0, {}
    optimizer_state = None
    if isinstance(resume, Path):
        checkpoint = load_checkpoint_at(resume, shard)
    else:
        checkpoint = load_latest_checkpoint(checkpoint_dir, shard) if (resume and checkpoint_dir) else None
    if checkpoint is not None:
        model_state, optimizer_state, loop_state = checkpoint
        load_model_shards(model, model_state) if sharded else model.load_state_dict(model_state)
        start_step, log, wall_before = loop_state["step"], loop_state["log"], loop_state["wall_time_s"]
        if start_step >= cfg.steps:
            raise UserError(f"the checkpoint is at step {start_step}; resume with more than {start_step} steps")
        positions = loop_state["stream_positions"]
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    if optimizer_state is not None:
        if sharded:
            load_optimizer_shards(optimizer, optimizer_state, list(model.parameters()))
        else:
            optimizer.load_state_dict(optimizer_state)

    def stream(name: str, data: Dataset | None) -> BatchStream | None:
        if data is None:
            return None
        return BatchStream(data, cfg.batch_size, derive_seed(cfg.seed, "data order", name), accelerator,
                           start_batch=positions.get(name, 0), shuffle=cfg.shuffle)

    ctx = StepContext(
        start_step, model, optimizer, accelerator, task, cfg, stream("forget", forget_data), stream("retain", retain_data)
    )
    training_mode(model, task)
    window: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    bar = progress(total=cfg.steps, initial=start_step, desc=desc, show=accelerator.is_local_main_process, dynamic_ncols=True)
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        ctx.step, ctx.noise = step, step_noise(cfg.seed, step, accelerator)
        with drawing_from(ctx.noise):
            figures = step_fn(ctx)
        for key, value in figures.items():
            window[key].append(float(value))
        done = step + 1
        if done == start_step + ESTIMATE_AFTER and accelerator.is_main_process:
            announce_duration(desc, (time.perf_counter() - started) / ESTIMATE_AFTER, cfg.steps - done)
        if done % cfg.log_every == 0 or done == cfg.steps:
            entry = {"step": done, "lr": cfg.lr_at(step), **_mean_across_processes(window, accelerator)}
            log.append(entry)
            window.clear()
            bar.set_postfix({k: f"{v:.3g}" for k, v in entry.items() if k != "step"})
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=done)  # the trackers, if any
            if accelerator.is_main_process:
                LOGGER.info("%s: step %d/%d, %s", desc, done, cfg.steps,
                            ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "step"))
            if observe is not None and done < cfg.steps:
                observe(done, gathered_copy(model) if sharded else accelerator.unwrap_model(model))
        if checkpoint_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            wall = wall_before + time.perf_counter() - started
            check_finite(model, done, cfg, checkpoint_dir)
            streams = {"forget": ctx.forget, "retain": ctx.retain}
            loop_state = {
                "log": log,
                "wall_time_s": wall,
                "stream_positions": {name: s.position for name, s in streams.items() if s is not None},
            }
            save_loop_checkpoint(checkpoint_dir, done, model, optimizer, loop_state, cfg.keep_checkpoints, accelerator)
        bar.update(1)
    bar.close()
    check_finite(model, cfg.steps, cfg, checkpoint_dir)  # a diverged run returns, and so publishes, nothing
    wall = wall_before + time.perf_counter() - started
    if sharded:
        optimizer.state.clear()  # the optimizer's shards go before the gathered copy comes
        return LoopResult(gathered_copy(model), log, cfg.steps, wall, accelerator.num_processes)
    return LoopResult(
        model=accelerator.unwrap_model(model, keep_fp32_wrapper=False),  # a plain module: no autocast left in forward
        log=log,
        steps=cfg.steps,
        wall_time_s=wall,
    )


def save_loop_checkpoint(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loop_state: dict,
                         keep: int, accelerator: Accelerator) -> None:
    """Checkpoint ``step`` (collective): the main process writes a whole model's, every process its shards of a
    sharded one's; the newest ``keep`` are kept."""
    accelerator.wait_for_everyone()
    if is_sharded(model):
        directory.mkdir(parents=True, exist_ok=True)
        save_sharded_checkpoint(checkpoint_path(directory, step), model, optimizer, {"step": step, **loop_state}, accelerator)
        if accelerator.is_main_process:
            prune_checkpoints(directory, keep)
    elif accelerator.is_main_process:
        save_checkpoint(directory, step, accelerator.unwrap_model(model), optimizer, loop_state, keep=keep)
    accelerator.wait_for_everyone()


def announce_duration(desc: str, seconds_per_step: float, remaining: int) -> None:
    """One log line with the time the rest of a loop will take, when over a minute (bars show it as an ETA)."""
    total = seconds_per_step * remaining
    if total > 60:
        LOGGER.info("%s: about %s more for %d iterations (%.2f s each); steps= (--steps) shortens it", desc,
                    f"{total / 60:.0f} min" if total < 5400 else f"{total / 3600:.1f} h", remaining, seconds_per_step)


def check_finite(model: nn.Module, step: int, cfg: LoopConfig, checkpoint_dir: Path | None) -> None:
    """A UserError, on every process alike, when any parameter or buffer is non-finite at ``step``: it names the
    entries, the last (finite) checkpoint to resume from and the setting to change."""
    sharded = is_sharded(model)
    bad = nonfinite_entries({name: local(value) for name, value in model.state_dict().items()})
    count = torch.tensor(len(bad), device=next(local(p) for p in model.parameters()).device)
    if sharded and int(sum_over_processes(count, True)) and not bad:
        bad = ["entries on another process"]  # every process stops together
    if not bad:
        return
    kept = checkpoints_newest_first(checkpoint_dir) if checkpoint_dir is not None else []
    resume = f"resume from {kept[0]} with" if kept else "run again with"
    raise UserError(f"the weights became non-finite by step {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                    f"{resume} a lower --lr (now {cfg.lr}) or a gradient clip; nothing was published")


def _mean_across_processes(window: dict[str, list[float]], accelerator: Accelerator) -> dict[str, float]:
    keys = sorted(window)
    local = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], device=accelerator.device)
    reduced = accelerator.reduce(local, reduction="mean") if accelerator.num_processes > 1 else local
    return {k: float(v) for k, v in zip(keys, reduced.tolist())}
