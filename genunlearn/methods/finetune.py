"""``finetune``: continue training on D_r only, letting the forget class fade (catastrophic forgetting)."""

from __future__ import annotations

from dataclasses import dataclass

from genunlearn.engine.loop import LoopConfig
from genunlearn.methods.common import unlearn_with_loop
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.engine.training import supervised_step


@dataclass
class FinetuneConfig(LoopConfig):
    """SGD on retain batches; defaults follow SalUn's classifier FT baseline (lr 0.01, momentum 0.9, wd 5e-4)."""


@register_method("finetune", "fine-tune on the retain set only (catastrophic forgetting baseline)", FinetuneConfig,
                 shards=True, lora=True)
def run(task, split, cfg: FinetuneConfig, accelerator, *, checkpoint_dir, resume) -> UnlearnResult:
    return unlearn_with_loop(
        task, split, cfg, accelerator, supervised_step, checkpoint_dir=checkpoint_dir, resume=resume, uses_forget=False
    )
