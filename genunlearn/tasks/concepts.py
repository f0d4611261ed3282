"""Concept erasure from a ``StableDiffusionPipeline`` the user holds: the prompts of an erasure (``ConceptPrompts``) and
a task over the pipeline trained on its own generations of them (``concept_task``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline

from genunlearn.data.generated import generated_prompt_datasets
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.models.presets import TextToImagePreset, get_preset
from genunlearn.models.prompt_sampling import sampling_pipeline
from genunlearn.tasks.text_to_image import TextToImageTask

REFERENCE_PRESET = "sd-1.5"  # a user's pipeline gets the references' Stable Diffusion method settings


@dataclass
class ConceptPrompts:
    """The prompts of one erasure: ``forget`` (the concept's prompts, erased and trained on), ``remain`` (kept, and
    the retain data), ``paraphrase`` (other prompts of the concept, never trained on: is erasure more than the exact
    prompt?), ``anchor`` (what rl pulls the concept towards; None: random ``remain`` prompts)."""

    forget: list[str]
    remain: list[str]
    paraphrase: list[str] = field(default_factory=list)
    anchor: str | None = None

    def __post_init__(self) -> None:
        self.forget, self.remain = list(dict.fromkeys(self.forget)), list(dict.fromkeys(self.remain))
        self.paraphrase = [p for p in dict.fromkeys(self.paraphrase) if p not in self.forget]
        check_prompts(self.forget, self.remain, self.paraphrase)
        if not self.remain:
            raise UserError("no prompts to retain; pass --retain-prompts FILE (one prompt per line)")

    @property
    def table(self) -> list[str]:
        """Every prompt, ids as used in labels and seeds: forget, then remain, then paraphrase."""
        return [*self.forget, *self.remain, *self.paraphrase]

    def groups(self) -> dict[str, list[int]]:
        """``{"forget", "remain", "paraphrase"}`` -> prompt ids into ``table``."""
        forget, remain = len(self.forget), len(self.remain)
        return {"forget": list(range(forget)), "remain": list(range(forget, forget + remain)),
                "paraphrase": list(range(forget + remain, forget + remain + len(self.paraphrase)))}

    def to_dict(self) -> dict:
        return {"forget": self.forget, "remain": self.remain, "paraphrase": self.paraphrase, "anchor": self.anchor}


def check_prompts(forget: list[str], remain: list[str], paraphrase: list[str]) -> None:
    """A UserError unless some prompt is erased, none is empty, and none is both erased (or a paraphrase) and kept."""
    if not forget:
        raise UserError("no concept given to erase; pass --concept PROMPT (or concepts=[...])")
    if any(not p.strip() for p in [*forget, *remain, *paraphrase]):
        raise UserError("a prompt is empty; every concept, retain and paraphrase prompt needs words")
    shared = (set(forget) | set(paraphrase)) & set(remain)
    if shared:
        raise UserError(f"{sorted(shared)[0]!r} is both erased and retained; take it out of the retain prompts")


def concept_task(
    pipeline: StableDiffusionPipeline,
    prompts: ConceptPrompts,
    *,
    per_prompt: int = 100,
    guidance: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    preset: str | TextToImagePreset = REFERENCE_PRESET,
    cache_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
) -> TextToImageTask:
    """A task over ``pipeline``'s UNet whose data is the pipeline's own generations: ``per_prompt`` latents of each
    forget and remain prompt (a quarter as many with other seeds as test data), DDIM ``steps`` on the pipeline's noise
    schedule at ``guidance``
    (default: the preset's sampling), seeded by ``seed``, cached under ``cache_dir/generated``. Labels are ids into
    ``prompts.table``, so ``genunlearn.forget_split(task, classes=prompts.groups()["forget"])`` is the erasure's split.
    ``preset``: whose method defaults apply (default ``sd-1.5``: the references' Stable Diffusion settings)."""
    if not isinstance(pipeline, StableDiffusionPipeline):
        raise UserError(f"concept erasure needs a diffusers StableDiffusionPipeline, got {type(pipeline).__name__}")
    if per_prompt < 2:
        raise UserError(f"per_prompt (--data-free-samples) must be at least 2, got {per_prompt}")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    accelerator = accelerator or make_accelerator()
    groups, table = prompts.groups(), prompts.table
    sampler = sampling_pipeline(pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler.config)
    train, test = generated_prompt_datasets(
        sampler, table, groups["forget"] + groups["remain"], per_prompt, accelerator,
        guidance=preset.sampling.guidance if guidance is None else guidance, steps=steps or preset.sampling.steps, seed=seed,
        cache_dir=None if cache_dir is None else Path(cache_dir))
    return TextToImageTask(preset, pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer,
                           DDPMScheduler.from_config(pipeline.scheduler.config), train, test, encoded_data=True,
                           cache_dir=None if cache_dir is None else Path(cache_dir), anchor=prompts.anchor,
                           rl_prompts=groups["remain"])  # SalUn's class script takes class k + 1's prompt; prompts have no order

