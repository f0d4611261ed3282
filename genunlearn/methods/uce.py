"""``uce`` (Unified Concept Editing, Gandikota et al., WACV 2024; rohitgandikota/unified-concept-editing): one
closed-form edit of every cross-attention key and value projection (``attn2.to_k``, ``attn2.to_v``), no training, so
that the concepts' text embeddings give what the guide's gave and the preserved prompts' give what they gave
(``engine.closed_form.least_squares_edit``). Several concepts are erased at once: every forget prompt is one."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from genunlearn.engine.closed_form import least_squares_edit
from genunlearn.errors import UserError
from genunlearn.methods.common import require_text_to_image, working_copy
from genunlearn.methods.registry import UnlearnResult, register_method

TOKENS = {
    "last": "the last word's token only (trainscripts/uce_sd_erase.py, 2025)",
    "last-onward": "the last word's token and every one after it (end and padding tokens), and the preserved prompts' "
                   "every token (train-scripts/train_erase.py, 2023: the paper's code, and RECE's starting point)",
}


@dataclass
class UCEConfig:
    """Defaults: ``uce_sd_erase.py`` (λ = 0.5, erase and preserve scales 1, keys and values edited, the last word's
    token, no preserved prompts, guide ``""`` for objects). ``guide``: what the concepts become (None: the run's
    ``--anchor``, else ``""``); ``preserve``: ``none`` or ``retained`` (the run's retain prompts, as the reference's
    ``--preserve_concepts``); ``tokens``: one of ``TOKENS``."""

    guide: str | None = None
    preserve: str = "none"
    tokens: str = "last"
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    with_to_k: bool = True
    seed: int = 0  # unused: the edit draws nothing

    def __post_init__(self) -> None:
        if self.preserve not in ("none", "retained"):
            raise UserError(f"uce preserve must be none or retained, got {self.preserve!r}")
        if self.tokens not in TOKENS:
            raise UserError(f"uce tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        if self.lamb <= 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise UserError("uce needs lamb > 0 and erase_scale, preserve_scale >= 0")


def cross_attention_projections(unet: nn.Module, with_to_k: bool = True) -> dict[str, nn.Linear]:
    """``{name: module}`` of the UNet's cross-attention value (and key) projections, as the reference collects them."""
    ends = ("to_v", "to_k") if with_to_k else ("to_v",)
    return {name: module for name, module in unet.named_modules() if "attn2" in name and name.endswith(ends)}


def last_word_index(tokenizer, prompt: str) -> int:
    """The position of ``prompt``'s last word token, as the reference finds it (attention-mask sum - 2: after the
    start token, before the end token; the start token itself for ``""``)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return max(len(ids) - 2, 0)


def prompt_embeddings(task, prompts: list[str]) -> torch.Tensor:
    """The denoiser's text conditioning ``[P, L, D]`` of ``prompts`` (the frozen encoders', as sampling sees it)."""
    with torch.no_grad():
        return task.encode_tokens(task.text_encoders, task.prompt_tokens(prompts))["encoder_hidden_states"].float().cpu()


def edit_rows(task, concepts: list[str], guides: list[str], preserved: list[str], tokens: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(concept rows [n, D], their guides' rows [n, D], preserved rows [m, D])``: the token embeddings the edit maps.

    ``last``: one row per prompt, its last word's. ``last-onward`` (2023 code): a concept's rows from its last word to
    the end, paired with its guide's from the guide's last word, both cut to the shorter window; all of a preserved
    prompt's rows."""
    tokenizer = task.tokenizers[0]
    embeds = prompt_embeddings(task, [*concepts, *guides, *preserved])
    concept_rows, guide_rows, preserved_rows = [], [], []
    for i, (concept, guide) in enumerate(zip(concepts, guides)):
        first, first_guide = last_word_index(tokenizer, concept), last_word_index(tokenizer, guide)
        length = embeds.shape[1] - max(first, first_guide) if tokens == "last-onward" else 1
        concept_rows.append(embeds[i, first:first + length])
        guide_rows.append(embeds[len(concepts) + i, first_guide:first_guide + length])
    for j, prompt in enumerate(preserved):
        row = embeds[2 * len(concepts) + j]
        preserved_rows.append(row if tokens == "last-onward" else row[last_word_index(tokenizer, prompt)][None])
    width = embeds.shape[2]
    return (torch.cat(concept_rows), torch.cat(guide_rows),
            torch.cat(preserved_rows) if preserved_rows else embeds.new_zeros(0, width))


@torch.no_grad()
def uce_edit(unet: nn.Module, concept_rows: torch.Tensor, guide_rows: torch.Tensor, preserved_rows: torch.Tensor,
             cfg: UCEConfig) -> int:
    """Edit ``unet``'s cross-attention projections in place: each maps ``concept_rows`` to what it mapped
    ``guide_rows`` to, and ``preserved_rows`` to what it mapped them to. Returns the number of layers edited."""
    layers = cross_attention_projections(unet, cfg.with_to_k)
    if not layers:
        raise UserError("uce edits a UNet's cross-attention projections (attn2.to_k/to_v); this denoiser has none "
                        "(SD3's joint attention is not served): use esd, salun or sfron")
    for layer in layers.values():
        weight = layer.weight
        device = weight.device
        old = weight.detach().float().cpu()
        edited = least_squares_edit(old, concept_rows, guide_rows @ old.T, preserved_rows, preserved_rows @ old.T,
                                    lamb=cfg.lamb, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale)
        weight.copy_(edited.to(device, weight.dtype))
    return len(layers)


@register_method("uce", "Unified Concept Editing: one closed-form edit of the cross-attention keys and values, no "
                 "training (text-to-image; several concepts at once)", UCEConfig, kinds=("text-to-image",))
def run(task, split, cfg: UCEConfig, accelerator, *, checkpoint_dir=None, resume=False) -> UnlearnResult:
    started = time.perf_counter()
    require_text_to_image(task, "uce")
    concepts = [task.prompts[i] for i in split.spec.classes]
    guide = cfg.guide if cfg.guide is not None else (task.anchor or "")
    preserved = [task.prompts[i] for i in (task.rl_prompts or [])] if cfg.preserve == "retained" else []
    model = working_copy(task, accelerator).eval()
    concept_rows, guide_rows, preserved_rows = edit_rows(task, concepts, [guide] * len(concepts), preserved, cfg.tokens)
    layers = uce_edit(model, concept_rows, guide_rows, preserved_rows, cfg)
    info = {"edited_layers": layers, "concepts": concepts, "guide": guide, "preserved_prompts": len(preserved),
            "tokens": cfg.tokens}
    return UnlearnResult(model, [], 0, time.perf_counter() - started, info)
