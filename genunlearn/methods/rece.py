"""``rece`` (Reliable and Efficient Concept Erasure, Gong et al., ECCV 2024; CharlesGong12/RECE ``train.py``): UCE, then
rounds of closed-form adversarial embeddings. Each round finds, per concept, the text embedding c' that the edited
cross-attention projections map nearest to what the original ones made of the concept's embedding,
c' = (Σ W'ᵀW' + rI)⁻¹ Σ W'ᵀW c (``close_form_emb_regzero``, every token, keys and values together), and edits the
projections again (UCE's equation, from the current weights) so that c' too gives the guide's output, the empty prompt
(and with ``preserve: retained`` the retain prompts) keeping theirs. No training."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from genunlearn.errors import UserError
from genunlearn.methods.common import require_text_to_image, working_copy
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.methods.uce import UCEConfig, cross_attention_projections, edit_rows, prompt_embeddings, uce_edit


@dataclass
class RECEConfig:
    """Defaults: ``train.py`` (3 rounds, regularisation r = 0.1, λ = 0.1, erase scale 1, preserve scale 0.1, guide
    ``" "``), starting from UCE as its checkpoints were made (the 2023 code: last word onward, towards ``""``, nothing
    preserved; λ = 0.5). ``train_object.py`` runs 1 round at r = 1e-3. ``preserve``: ``none`` (only ``""`` kept, as
    the reference's retain list always starts with it) or ``retained`` (the run's retain prompts too)."""

    rounds: int = 3
    regular_scale: float = 0.1
    lamb: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    guide: str = " "
    preserve: str = "none"
    seed: int = 0  # unused: the edits draw nothing

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.regular_scale <= 0 or self.lamb <= 0:
            raise UserError("rece needs rounds >= 0, regular_scale > 0 and lamb > 0")
        if self.preserve not in ("none", "retained"):
            raise UserError(f"rece preserve must be none or retained, got {self.preserve!r}")


def adversarial_embedding(edited: list[nn.Linear], original: list[nn.Linear], concept: torch.Tensor,
                          regular_scale: float) -> torch.Tensor:
    """c' ``[L, D]`` for a concept's embedding ``concept`` ``[L, D]``: argmin Σ_l ‖W'_l c' − W_l c‖² + r‖c'‖² over the
    ``edited`` projections W' and their ``original`` W, per token."""
    width = concept.shape[1]
    gram, cross = regular_scale * torch.eye(width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64)
    for new, old in zip(edited, original):
        w_new, w_old = new.weight.detach().double().cpu(), old.weight.detach().double().cpu()
        gram += w_new.T @ w_new
        cross += w_new.T @ w_old
    return (concept.double() @ torch.linalg.solve(gram, cross).T).float()


@register_method("rece", "RECE: UCE, then rounds of closed-form adversarial embeddings erased the same way (text-to-image; "
                 "no training)", RECEConfig, kinds=("text-to-image",))
def run(task, split, cfg: RECEConfig, accelerator, *, checkpoint_dir=None, resume=False) -> UnlearnResult:
    started = time.perf_counter()
    require_text_to_image(task, "rece")
    concepts = [task.prompts[i] for i in split.spec.classes]
    model = working_copy(task, accelerator).eval()
    start = UCEConfig(tokens="last-onward")  # the reference's UCE checkpoints: train_erase.py, towards "", no preserve
    uce_edit(model, *edit_rows(task, concepts, [""] * len(concepts), [], start.tokens), start)
    kept = ["", *([task.prompts[i] for i in (task.rl_prompts or [])] if cfg.preserve == "retained" else [])]
    concept_rows, guide, kept_rows = prompt_embeddings(task, concepts), prompt_embeddings(task, [cfg.guide])[0], prompt_embeddings(task, kept)
    original = list(cross_attention_projections(task.model).values())
    rounds = UCEConfig(lamb=cfg.lamb, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale)
    guides, preserved = guide.repeat(len(concepts), 1), kept_rows.reshape(-1, kept_rows.shape[-1])
    for _ in range(cfg.rounds):  # each round's targets are the current weights' outputs, as edit_model_adversarial's
        layers = list(cross_attention_projections(model).values())
        adversarial = torch.cat([adversarial_embedding(layers, original, c, cfg.regular_scale) for c in concept_rows])
        uce_edit(model, adversarial, guides, preserved, rounds)
    info = {"concepts": concepts, "rounds": cfg.rounds, "edited_layers": len(original), "preserved_prompts": len(kept)}
    return UnlearnResult(model, [], 0, time.perf_counter() - started, info)
