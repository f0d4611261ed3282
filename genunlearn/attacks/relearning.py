"""The relearning attack: fine-tune the erased model for a few steps on a few images of the concept (its training
loss, the preset's pretraining optimiser; ``engine.relearn.relearn_curve``) and measure how much of it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from genunlearn.attacks.base import AttackJudge, AttackOutcome
from genunlearn.engine.relearn import relearn_curve
from genunlearn.errors import UserError
from genunlearn.tasks.text_to_image import TextConditioned


@dataclass
class RelearnConfig:
    """``steps`` fine-tuning steps on ``images`` images of the concept (the original model's generations of the erased
    prompts, as the erasure's forget data), at ``lr`` (None: the preset's pretraining rate)."""

    steps: int = 50
    images: int = 16
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images < 1 or (self.lr is not None and self.lr <= 0):
            raise UserError("relearn needs steps >= 1, images >= 1 and lr > 0")


def relearn(setting: AttackJudge, model: nn.Module, cfg: RelearnConfig, split) -> AttackOutcome:
    """forget_acc before (pre-ASR) and after (post-ASR) ``cfg.steps`` steps of relearning on ``cfg.images`` images of
    ``split``'s forget set (drawn by the run's seed); the denoiser relearns (a text encoder the erasure trained is held
    as it left it); ``model`` itself is not changed."""
    if setting.forget_accuracy is None:
        raise UserError("the relearn attack needs the run's forget accuracy")
    started = time.perf_counter()
    encoders = model.text_encoders if isinstance(model, TextConditioned) else nn.ModuleList()
    trainable = [p.requires_grad for p in encoders.parameters()]
    encoders.requires_grad_(False)  # the denoiser relearns, for every erasure alike; a trained text encoder stays
    try:
        curve = relearn_curve(setting.task, model, split, cfg.steps, setting.forget_accuracy, setting.accelerator,
                              samples=cfg.images, seed=setting.seed, lr=cfg.lr)
    finally:
        for parameter, flag in zip(encoders.parameters(), trainable):
            parameter.requires_grad_(flag)
    samples = setting.per_prompt * len(setting.forget)
    lr = setting.task.preset.train.lr if cfg.lr is None else cfg.lr
    return AttackOutcome("relearn", curve[0]["forget_acc"], curve[-1]["forget_acc"], samples,
                         {"steps": cfg.steps, "images": min(cfg.images, len(split.forget)), "lr": lr},
                         time.perf_counter() - started, {"curve": curve})
