"""Training from scratch under accelerate: pretraining a preset, and the ``retrain`` oracle on D_r."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from genunlearn.engine.loop import LoopConfig, LoopResult, StepContext, run_loop
from genunlearn.models.presets import TrainRecipe
from genunlearn.tasks.base import Task


def supervised_step(ctx: StepContext) -> dict[str, float]:
    """One descent step on the mean training loss of a retain batch (true labels; diffusion: with label dropout)."""
    loss = ctx.task.training_loss(ctx.model, ctx.retain.next()).mean()
    ctx.backward_step(loss)
    return {"retain_loss": loss.item()}


@dataclass
class TrainConfig(LoopConfig):
    """A loop config whose length may be given in epochs of the training data (``epochs`` wins over ``steps``)."""

    epochs: int | None = None
    schedule: str = "cosine"

    @classmethod
    def from_recipe(cls, recipe: TrainRecipe, **overrides) -> "TrainConfig":
        """The loop settings of ``recipe``; a classifier's loss and a decay toward the PEFT start are the task's
        (its ``training_loss``), so the optimizer then decays nothing."""
        loop_fields = {name: value for name, value in recipe.__dict__.items() if name in cls.__dataclass_fields__}
        if getattr(recipe, "decay_to", "zero") == "start":
            loop_fields["weight_decay"] = 0.0
        return cls(**{**loop_fields, **overrides})

    def resolved(self, dataset_size: int, num_processes: int) -> "TrainConfig":
        """A copy with ``steps`` set from ``epochs`` for this dataset and the global batch."""
        if self.epochs is None:
            return self
        steps = self.epochs * math.ceil(dataset_size / (self.batch_size * num_processes))
        return TrainConfig(**{**self.__dict__, "steps": steps, "epochs": None})


def train_from_scratch(
    task: Task,
    dataset: Dataset,
    cfg: TrainConfig,
    accelerator: Accelerator,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool | Path = False,
    desc: str = "training",
) -> LoopResult:
    """Initialise a fresh model (seeded by ``cfg.seed``) and train it on ``dataset`` with ``cfg`` (sharded under an FSDP
    launch, as every loop)."""
    torch.manual_seed(cfg.seed)
    model = task.fresh_model()
    cfg = cfg.resolved(len(dataset), accelerator.num_processes)
    return run_loop(
        model, task, supervised_step, cfg, accelerator,
        retain_data=dataset, checkpoint_dir=checkpoint_dir, resume=resume, desc=desc,
    )
