"""Concept erasure from a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` the user holds: the prompts of an erasure (``ConceptPrompts``) and
a task over the pipeline trained on its own generations of them (``concept_task``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from accelerate import Accelerator
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from genunlearn.data.captioned_folder import load_images
from genunlearn.data.generated import generated_prompt_datasets, stacked
from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.models.held import TEXT_TO_IMAGE_REFERENCE
from genunlearn.models.presets import TextToImagePreset, get_preset
from genunlearn.models.prompt_sampling import denoiser_of, sampler_like
from genunlearn.tasks.text_to_image import TextToImageTask
from genunlearn.tasks.text_to_image_pipelines import text_to_image_task

REFERENCE_PRESET = TEXT_TO_IMAGE_REFERENCE  # a user's pipeline gets the references' Stable Diffusion method settings


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
    images: Sequence[tuple[str | Path, str]] = (),
    preset: str | TextToImagePreset = REFERENCE_PRESET,
    cache_dir: str | Path | None = None,
    accelerator: Accelerator | None = None,
) -> TextToImageTask:
    """A task over ``pipeline``'s UNet whose data is, per forget and remain prompt, the user's ``images`` captioned with
    it (``(path, caption)`` pairs, e.g. ``read_captioned_folder``'s; a fifth held out as test data, drawn by ``seed``),
    else the pipeline's own generations: ``per_prompt`` latents (a quarter as many with other seeds as test data), DDIM
    ``steps`` on the pipeline's noise schedule at ``guidance`` (default: the preset's sampling), seeded by ``seed``,
    cached under ``cache_dir/generated``. Labels are ids into ``prompts.table``, so
    ``genunlearn.forget_split(task, classes=prompts.groups()["forget"])`` is the erasure's split. ``preset``: whose
    method defaults apply (default ``sd-1.5``: the references' Stable Diffusion settings)."""
    if not isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline)):
        raise UserError(f"concept erasure needs a diffusers StableDiffusionPipeline, StableDiffusionXLPipeline or "
                        f"StableDiffusion3Pipeline, got {type(pipeline).__name__}")
    if per_prompt < 2:
        raise UserError(f"per_prompt (--data-free-samples) must be at least 2, got {per_prompt}")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    accelerator = accelerator or make_accelerator()
    groups, table = prompts.groups(), prompts.table
    trained = groups["forget"] + groups["remain"]
    captioned = images_by_prompt(images, table, trained)
    parts = []
    if captioned:
        parts.append(encoded_image_datasets(pipeline, captioned, table, seed))
    generated = [i for i in trained if i not in captioned]
    if generated:
        sampler = sampler_like(pipeline)
        parts.append(generated_prompt_datasets(
            sampler, table, generated, per_prompt, accelerator,
            guidance=preset.sampling.guidance if guidance is None else guidance, steps=steps or preset.sampling.steps,
            seed=seed, cache_dir=None if cache_dir is None else Path(cache_dir)))
    train, test = (LabeledTensorDataset(torch.cat([part[k].images for part in parts]),
                                        torch.cat([part[k].targets for part in parts]), table) for k in (0, 1))
    options = dict(encoded_data=True, cache_dir=None if cache_dir is None else Path(cache_dir), anchor=prompts.anchor,
                   rl_prompts=groups["remain"])  # SalUn's class script takes class k + 1's prompt; prompts have no order
    return text_to_image_task(pipeline, preset, None, train, test, **options)


def images_by_prompt(images: Sequence[tuple[str | Path, str]], table: list[str], trained: list[int]) -> dict[int, list[Path]]:
    """``{prompt id: image paths}`` of the ``(path, caption)`` pairs, each caption one of the ``trained`` prompts of
    ``table`` (whitespace aside); a UserError for a caption that is not, or a prompt with a single image."""
    ids = {" ".join(table[i].split()): i for i in trained}
    grouped: dict[int, list[Path]] = {}
    for path, caption in images:
        key = " ".join(caption.split())
        if key not in ids:
            raise UserError(f"{path}: its caption {caption!r} is neither a concept nor a retain prompt; add it to "
                            "--retain-prompts or --concept, or leave the image out")
        grouped.setdefault(ids[key], []).append(Path(path))
    for prompt_id, paths in grouped.items():
        if len(paths) < 2:
            raise UserError(f"only one image is captioned {table[prompt_id]!r}; give at least 2 (one is held out as test data)")
    return grouped


IMAGE_SEED_OFFSET = 40_009  # the VAE's latent draws of user images share no seed with generation or evaluation


@torch.no_grad()
def encoded_image_datasets(pipeline: StableDiffusionPipeline, captioned: dict[int, list[Path]], table: list[str],
                           seed: int) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """``(train, test)`` latents of the user's images per prompt id (labels): each image at the pipeline's resolution
    and channels, encoded by its VAE (a draw from the latent distribution, less any shift factor (SD3), times the
    scaling factor, as diffusers'
    text-to-image training encodes), a fifth of each prompt's images (at least one) held out as test data."""
    vae = pipeline.vae
    side = denoiser_of(pipeline).config.sample_size * pipeline.vae_scale_factor
    shape = (vae.config.in_channels, side, side)
    generator = torch.Generator().manual_seed(seed + IMAGE_SEED_OFFSET)
    splits: dict[str, dict[int, torch.Tensor]] = {"train": {}, "test": {}}
    for prompt_id, paths in sorted(captioned.items()):
        order = torch.randperm(len(paths), generator=generator).tolist()
        held = max(1, len(paths) // 5)
        for split, chosen in (("test", order[:held]), ("train", order[held:])):
            pixels = load_images([paths[i] for i in chosen], shape).to(vae.device, vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) - (vae.config.get("shift_factor") or 0.0)
            latents = latents * vae.config.scaling_factor
            splits[split][prompt_id] = latents.float().cpu()
    return tuple(LabeledTensorDataset(*stacked(splits[split], sorted(captioned)), table) for split in ("train", "test"))
