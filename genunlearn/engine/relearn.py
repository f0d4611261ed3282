"""Telling forgetting from hiding: the retrain oracle (cached) and the relearning check.

Relearning fine-tunes a copy of a model on a few forget samples and records how fast the forgotten class
comes back. A model that really forgot relearns about as slowly as the retrain oracle, which never saw
the class; one that only hides it gets it back within a few steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Subset

from genunlearn.data.split import ForgetSplit
from genunlearn.engine.loop import run_loop, training_mode
from genunlearn.precision import numerics
from genunlearn.storage.cache import cached_or_built
from genunlearn.engine.training import TrainConfig, supervised_step, train_from_scratch

Measure = Callable[[nn.Module], float]


def relearn_curve(task, model: nn.Module, split: ForgetSplit, steps: int, measure: Measure, accelerator: Accelerator,
                  *, samples: int = 8, seed: int = 0, points: int = 4, lr: float | None = None) -> list[dict]:
    """``[{"step", "forget_acc"}]`` at step 0, every ``steps / points`` steps and at the end, for a copy of ``model``
    trained with the task's training loss on ``samples`` forget samples (chosen by ``seed``), with the preset's
    pretraining optimiser and learning rate (or ``lr``) held constant. ``model`` itself is not modified."""
    chosen = torch.randperm(len(split.forget), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    every = max(1, steps // points)
    recipe = task.preset.train
    cfg = TrainConfig.from_recipe(recipe, steps=steps, epochs=None, schedule="constant", seed=seed, log_every=every,
                                  lr=recipe.lr if lr is None else lr, batch_size=max(1, min(len(chosen), recipe.batch_size) // accelerator.num_processes))
    curve = [{"step": 0, "forget_acc": measure(model)}]

    def observe(step: int, relearning: nn.Module) -> None:
        curve.append({"step": step, "forget_acc": measure(relearning)})
        training_mode(relearning, task)

    result = run_loop(copy.deepcopy(model), task, supervised_step, cfg, accelerator, retain_data=Subset(split.forget, chosen),
                      desc="relearning", observe=observe)
    curve.append({"step": steps, "forget_acc": measure(result.model)})
    return curve


def retrain_oracle(task, split: ForgetSplit, data_id: str, root: Path, accelerator: Accelerator,
                   save: Callable[[nn.Module, Path], None], load: Callable[[Path], nn.Module], marker: str) -> nn.Module:
    """The preset trained from scratch on ``split.retain`` with its pretraining recipe, cached under
    ``root/retrain`` by (preset, data, split, numerics); ``save(model, folder)``/``load(folder)`` store it (``marker``: the
    file that proves a finished entry)."""
    key = json.dumps([task.preset.fingerprint(), data_id, split.summary(), numerics(accelerator)], sort_keys=True)
    entry = root / "retrain" / f"{task.preset.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def train_and_save() -> None:
        cfg = TrainConfig.from_recipe(task.preset.train, seed=split.spec.seed)
        model = train_from_scratch(task, split.retain, cfg, accelerator, desc="retrain oracle").model
        if accelerator.is_main_process:
            save(accelerator.unwrap_model(model).cpu(), entry)

    return cached_or_built(entry, marker, train_and_save, load, accelerator, f"the retrain oracle of {task.preset.name}")
