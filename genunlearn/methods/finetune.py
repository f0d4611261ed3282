"""``finetune``: continue training on D_r only, letting the forget class fade (catastrophic forgetting)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from genunlearn.engine.loop import LoopConfig
from genunlearn.methods.common import unlearn_with_loop
from genunlearn.methods.registry import register_method
from genunlearn.training import supervised_step


@dataclass
class FinetuneConfig(LoopConfig):
    """SGD on retain batches; defaults follow SalUn's classifier FT baseline (lr 0.01, momentum 0.9, wd 5e-4)."""


run = register_method("finetune", "fine-tune on the retain set only (catastrophic forgetting baseline)", FinetuneConfig)(
    partial(unlearn_with_loop, step_fn=supervised_step, uses_forget=False)
)
