"""What every attack on a concept erasure shares: the judge that scores it (the one forget_acc uses), generation from
prompt embeddings with the evaluation's seeds, and the outcome record (attack success rate, sample size, budget)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from torch import nn

from genunlearn.errors import UserError
from genunlearn.eval.concepts import prompt_class
from genunlearn.models.sampling import SAMPLE_BATCH, class_generator
from genunlearn.tasks.text_to_image import conditioned_parts


@dataclass
class AttackJudge:
    """What an attack is scored with: the task (its prompt table, frozen text encoder and original denoiser), the
    judge classifier and its class names, and the evaluation protocol (``per_prompt`` generations per prompt, DDIM
    ``steps`` at ``guidance``, seeded by (``seed``, prompt id) as forget_acc's are); prompt ids: ``forget`` (erased),
    ``paraphrase`` (held-out phrasings of it), ``remain`` (kept); ``forget_accuracy``: the run's forget_acc of a model
    (for relearning)."""

    task: object
    judge: nn.Module
    class_names: list[str]
    forget: list[int]
    paraphrase: list[int]
    remain: list[int]
    per_prompt: int
    guidance: float
    steps: int
    seed: int
    accelerator: Accelerator
    forget_accuracy: Callable[[nn.Module], float] | None = None

    @property
    def targets(self) -> list[int]:
        """The prompt ids an attack tries to bring back: the erased prompts and their paraphrases."""
        return [*self.forget, *self.paraphrase]

    def concept_class(self, prompt_id: int) -> int:
        target = prompt_class(self.task.prompts[prompt_id], self.class_names)
        if target is None:
            raise UserError(f"{self.task.prompts[prompt_id]!r} names no class of the judge; attacks need one to score")
        return target

    @torch.no_grad()
    def recognised(self, images: torch.Tensor, prompt_id: int) -> torch.Tensor:
        """``[N]`` bool: whether the judge sees the prompt's class in each image ``[N, C, H, W]`` in [-1, 1]."""
        device = next(self.judge.parameters()).device
        return self.judge.eval()(images.to(device)).argmax(1).cpu() == self.concept_class(prompt_id)


@dataclass
class AttackOutcome:
    """One attack's figures: ``pre_asr`` (the erased model on the plain prompts) and ``post_asr`` (under the attack),
    each the fraction of ``samples`` judged to show the concept; ``budget``: the attack's settings; ``details``: what
    it found (adversarial prompts, relearning curves)."""

    name: str
    pre_asr: float
    post_asr: float
    samples: int
    budget: dict
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"pre_asr": self.pre_asr, "post_asr": self.post_asr, "samples": self.samples, "budget": self.budget,
                "seconds": self.seconds, **self.details}


@torch.no_grad()
def generate_from_embeddings(pipeline: StableDiffusionPipeline, embeds: torch.Tensor, prompt_id: int, count: int, *,
                             guidance: float, steps: int, seed: int) -> torch.Tensor:
    """``count`` generations ``[count, C, H, W]`` in [-1, 1] of ``pipeline`` (``sd_pipeline_for`` the attacked model,
    on its device) conditioned on ``embeds`` ``[1, L, D]`` (an attacked prompt's encoding; ∅ as the pipeline encodes
    it), seeded by (seed, ``prompt_id``) as the evaluation's."""
    chunks = []
    for chunk, start in enumerate(range(0, count, SAMPLE_BATCH)):
        size = min(SAMPLE_BATCH, count - start)
        output = pipeline(prompt_embeds=embeds.to(pipeline.device).expand(size, -1, -1), num_inference_steps=steps,
                          guidance_scale=guidance, generator=class_generator(seed, prompt_id, chunk), output_type="pt")
        chunks.append(output.images.float().cpu() * 2 - 1)
    return torch.cat(chunks)


@torch.no_grad()
def encode_ids(task, ids: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """The denoiser's conditioning ``[B, L, D]`` of token ids ``[B, L]``: by ``model``'s text encoder (the task's
    frozen one, unless the erasure trained its own: ``conditioned_parts``)."""
    encoders = task.text_encoders if model is None else conditioned_parts(model, task.text_encoders)[1]
    return task.encode_tokens(encoders, [ids])["encoder_hidden_states"]
