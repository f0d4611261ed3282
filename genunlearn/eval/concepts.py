"""Concept-erasure figures of a text-to-image model (ALGORITHMS_T2I.md §4, at toy scale): whether a judge still
recognises each prompt's concept in the model's generations (the erased prompts, held-out paraphrases of them, the
remaining prompts), the remaining prompts' FID against the original model's generations in the judge's features (and
against real images of them, where there are some), and the mean ink level as the style measure of the digit styles
(bold raises it, thin lowers it, inverted flips it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator
from torch import nn

from genunlearn.data.captioned_digits import DIGIT_WORDS
from genunlearn.eval.fid import ClassifierFeatures, extract_features, fid_from_features
from genunlearn.models.prompt_sampling import sample_prompts, sd_pipeline_for
from genunlearn.tasks.text_to_image import TextToImageTask


def prompt_class(prompt: str, class_names: Sequence[str]) -> int | None:
    """The judge class ``prompt`` asks for: the class named in it by the longest name (a word or phrase of the prompt;
    a class name may list synonyms, "tench, Tinca tinca" as timm's ImageNet names do, and "French horn" outranks the
    "horn" of "cornet, horn"; a digit class is also named by its word, "three" for "3"); None when no class is named
    or two are by names of the same length ("three or 4")."""
    text = f" {' '.join(prompt.lower().replace(',', ' ').split())} "
    longest: dict[int, int] = {}
    for index, name in enumerate(class_names):
        synonyms = [part.strip().lower() for part in name.split(",") if part.strip()]
        if name.isdigit() and int(name) < len(DIGIT_WORDS):
            synonyms.append(DIGIT_WORDS[int(name)])
        lengths = [len(synonym.split()) for synonym in synonyms if f" {synonym} " in text]
        if lengths:
            longest[index] = max(lengths)
    best = [index for index, length in longest.items() if length == max(longest.values(), default=0)]
    return best[0] if len(best) == 1 else None


def ink_level(images: torch.Tensor) -> float:
    """Mean ink ``(x + 1) / 2`` of images ``[N, C, H, W]`` in [-1, 1]: the digit styles' measure."""
    return float(((images.float() + 1) / 2).mean())


@torch.no_grad()
def concept_metrics(generations: dict[int, torch.Tensor], prompts: Sequence[str], groups: dict[str, list[int]],
                    judge: nn.Module, class_names: Sequence[str], reference: torch.Tensor | None = None,
                    real_reference: torch.Tensor | None = None) -> dict:
    """Figures of ``generations`` (``{prompt id: images [N, C, H, W] in [-1, 1]}``): per prompt its judge class, the
    fraction the judge labels that class (``recognised``; None for a prompt naming no class) and ``ink_level``; per
    group of prompt ids (``groups``: ``forget``, the erased prompts; ``paraphrase``, held-out paraphrases of them;
    ``remain``, the retained prompts) ``<group>_acc``, the mean recognition over its prompts that name a class, and
    ``<group>_ink``, its mean ink level; with ``reference`` (features ``[M, D]`` of the original model's generations of
    the remaining prompts) ``fid_remain``, the pooled ``remain`` generations' FID against them in the judge's features;
    with ``real_reference`` (features of real images of the remaining prompts) ``fid_remain_real``, the same against
    those."""
    device = next(judge.parameters()).device
    judge = judge.eval()
    per_prompt = {}
    for prompt_id, images in generations.items():
        target = prompt_class(prompts[prompt_id], class_names)
        predicted = judge(images.to(device)).argmax(1).cpu()
        per_prompt[prompts[prompt_id]] = {"class": target, "ink_level": ink_level(images),
                                          "recognised": None if target is None else float((predicted == target).double().mean())}
    metrics: dict = {}
    for group, ids in groups.items():
        scores = [per_prompt[prompts[i]]["recognised"] for i in ids if per_prompt[prompts[i]]["recognised"] is not None]
        metrics[f"{group}_acc"] = sum(scores) / len(scores) if scores else None
    for group, ids in groups.items():
        inks = [per_prompt[prompts[i]]["ink_level"] for i in ids]
        metrics[f"{group}_ink"] = sum(inks) / len(inks) if inks else None
    if groups.get("remain") and (reference is not None or real_reference is not None):
        retained = extract_features(torch.cat([generations[i] for i in groups["remain"]]), ClassifierFeatures(judge))
        if reference is not None:
            metrics["fid_remain"] = fid_from_features(reference, retained)
        if real_reference is not None:
            metrics["fid_remain_real"] = fid_from_features(real_reference, retained)
    return {**metrics, "per_prompt": per_prompt}


REFERENCE_SEED_OFFSET = 30_011  # the original model's reference generations never share the evaluation's seeds


def evaluate_concepts(task: TextToImageTask, judge: nn.Module, class_names: Sequence[str], groups: dict[str, list[int]],
                      accelerator: Accelerator, *, model: nn.Module | None = None, prompts: Sequence[str] | None = None,
                      per_prompt: int, guidance: float, steps: int, seed: int = 0,
                      reference: torch.Tensor | None = None,
                      real_reference: torch.Tensor | None = None) -> tuple[dict, dict[int, torch.Tensor]]:
    """``(concept_metrics, generations)`` of ``task``'s UNet (or ``model``): ``per_prompt`` generations of every prompt
    in ``groups`` (ids into ``prompts``, default ``task.prompts``) with DDIM ``steps`` and ``guidance``, seeded by
    (``seed``, prompt id)."""
    prompts = list(task.prompts if prompts is None else prompts)
    ids = sorted({i for members in groups.values() for i in members})
    generations = sample_prompts(sd_pipeline_for(task, model), prompts, ids, per_prompt, accelerator, guidance=guidance,
                                 steps=steps, seed=seed)
    return concept_metrics(generations, prompts, groups, judge, class_names, reference, real_reference), generations


def retain_reference(task: TextToImageTask, judge: nn.Module, retain: list[int], accelerator: Accelerator, *,
                     per_prompt: int, guidance: float, steps: int, seed: int = 0) -> torch.Tensor:
    """The judge's features ``[N, D]`` of the original model's generations of the ``retain`` prompts (ids into
    ``task.prompts``), on seeds the evaluation never uses: what ``fid_remain`` compares against (data-free, as the
    class-conditional runs do)."""
    generations = sample_prompts(sd_pipeline_for(task), task.prompts, retain, per_prompt, accelerator, guidance=guidance,
                                 steps=steps, seed=seed + REFERENCE_SEED_OFFSET)
    return extract_features(torch.cat([generations[i] for i in retain]), ClassifierFeatures(judge))


def real_retain_reference(images: Sequence[torch.Tensor], judge: nn.Module) -> torch.Tensor:
    """The judge's features ``[N, D]`` of real images of the retained prompts (``images``: ``[N_p, C, H, W]`` in
    [-1, 1] per prompt, pooled): what ``fid_remain_real`` compares against, as the papers' FID against real images."""
    return extract_features(torch.cat(list(images)), ClassifierFeatures(judge))
