"""Ring-A-Bell (Tsai et al., ICLR 2024; chiayi-hsu/Ring-A-Bell): a concept vector in the text encoder's output space,
the mean difference of the encodings of prompts with and without the concept, added with strength η to the attacked
prompts' encodings. The reference then searches (a genetic algorithm) for a discrete prompt whose encoding is near
that target; here the target encoding conditions the model directly, the continuous form the search approximates."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from genunlearn.attacks.base import AttackJudge, AttackOutcome, encode_ids, generate_from_embeddings
from genunlearn.errors import UserError
from genunlearn.models.prompt_prefix import require_single_clip
from genunlearn.models.prompt_sampling import sd_pipeline_for


@dataclass
class RingABellConfig:
    """``strength``: η, the reference's coefficient (3 in its nudity notebook); pairs: each erased prompt against each
    retained prompt (with the concept, without it), so the vector points from the kept prompts to the erased one."""

    strength: float = 3.0

    def __post_init__(self) -> None:
        if self.strength <= 0:
            raise UserError(f"ringabell strength must be positive, got {self.strength}")


def concept_vector(task, with_concept: list[str], without_concept: list[str], model: nn.Module | None = None) -> torch.Tensor:
    """``[L, D]``: mean encoding of ``with_concept`` minus mean encoding of ``without_concept`` (the pairs' mean
    difference when every prompt of one list is paired with every prompt of the other), by ``model``'s text encoder
    (``encode_ids``)."""
    with torch.no_grad():
        encoded = [encode_ids(task, task.prompt_tokens(prompts)[0], model).float().mean(0)
                   for prompts in (with_concept, without_concept)]
    return (encoded[0] - encoded[1]).cpu()


def ring_a_bell(setting: AttackJudge, model: nn.Module, cfg: RingABellConfig) -> AttackOutcome:
    """Generate every target prompt from its encoding plus ``cfg.strength`` × the concept vector (the erased prompts
    against the retained ones) and judge the generations, beside the same seeds' generations of the plain prompts.
    Both come from the attacked model's text encoder: the erased one when the erasure trained it (AdvUnlearn)."""
    task = setting.task
    require_single_clip(task, "the ringabell attack", "use --attack relearn")
    started = time.perf_counter()
    vector = concept_vector(task, [task.prompts[i] for i in setting.forget], [task.prompts[i] for i in setting.remain], model)
    pipeline = sd_pipeline_for(task, model).to(setting.accelerator.device)
    options = dict(guidance=setting.guidance, steps=setting.steps, seed=setting.seed)
    hits = {"plain": 0, "attacked": 0}
    for prompt_id in setting.targets:
        plain = encode_ids(task, task.prompt_tokens([task.prompts[prompt_id]])[0], model).float().cpu()
        for name, embeds in (("plain", plain), ("attacked", plain + cfg.strength * vector)):
            images = generate_from_embeddings(pipeline, embeds, prompt_id, setting.per_prompt, **options)
            hits[name] += int(setting.recognised(images, prompt_id).sum())
    total = setting.per_prompt * len(setting.targets)
    return AttackOutcome("ringabell", hits["plain"] / total, hits["attacked"] / total, total,
                         {"strength": cfg.strength, "pairs": len(setting.forget) * len(setting.remain)},
                         time.perf_counter() - started)
