"""``retrain``: train from scratch on D_r with the preset's pretraining recipe (the gold standard)."""

from __future__ import annotations

from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.engine.training import TrainConfig, train_from_scratch


@register_method("retrain", "train from scratch on the retain set with the pretraining recipe (oracle)", TrainConfig,
                 preset_layer=lambda preset: TrainConfig.from_recipe(preset.train).__dict__, shards=True)
def run(task, split, cfg: TrainConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    result = train_from_scratch(task, split.retain, cfg, accelerator, checkpoint_dir=checkpoint_dir, resume=resume,
                                desc="retrain")
    return UnlearnResult(result.model, result.log, result.steps, result.wall_time_s, result.sharding_info())
