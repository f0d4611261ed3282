"""UCE: the closed-form edit written out by hand, what it changes in a Stable Diffusion UNet, and where it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genunlearn as gu
from helpers import tiny_sd15_pipeline
from genunlearn.errors import UserError
from genunlearn.methods.rece import adversarial_embedding
from genunlearn.methods.uce import UCEConfig, cross_attention_projections, edit_rows, last_word_index, prompt_embeddings, uce_edit
from genunlearn.models.tiny_sd3 import tiny_stable_diffusion_3

PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat", "a photo of a bird"], remain=["a photo of a dog", "a photo of a car"],
                            anchor="a photo")


@pytest.fixture(scope="module")
def sd_task(accelerator):
    return gu.concept_task(tiny_sd15_pipeline(PROMPTS.table), PROMPTS, per_prompt=2, steps=2, guidance=3.0,
                           accelerator=accelerator)


class CrossAttention(nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.to_k, self.to_v = nn.Linear(width, out, bias=False), nn.Linear(width, out, bias=False)


def test_the_edit_is_uces_equation_written_out_by_hand():
    torch.manual_seed(0)
    unet = nn.Module()
    unet.attn2 = CrossAttention(6, 4)
    old = {name: m.weight.detach().clone() for name, m in cross_attention_projections(unet).items()}
    concepts, guides, kept = torch.randn(2, 6), torch.randn(2, 6), torch.randn(3, 6)
    cfg = UCEConfig(lamb=0.5, erase_scale=1.0, preserve_scale=0.7)
    assert uce_edit(unet, concepts, guides, kept, cfg) == 2
    for name, w in old.items():
        mat1, mat2 = 0.5 * w.double(), 0.5 * torch.eye(6, dtype=torch.float64)
        for c, g in zip(concepts.double(), guides.double()):  # Σ v*ᵢ cᵢᵀ with v*ᵢ = W_old gᵢ
            mat1 += torch.outer(w.double() @ g, c)
            mat2 += torch.outer(c, c)
        for c in kept.double():
            mat1 += 0.7 * torch.outer(w.double() @ c, c)
            mat2 += 0.7 * torch.outer(c, c)
        expected = (mat1 @ torch.inverse(mat2)).float()
        assert torch.allclose(dict(unet.named_modules())[name].weight, expected, atol=1e-6)


def test_a_heavily_weighted_concept_is_mapped_onto_its_guide_and_preserved_inputs_onto_themselves():
    torch.manual_seed(1)
    unet = nn.Module()
    unet.attn2 = CrossAttention(8, 8)
    old = unet.attn2.to_v.weight.detach().clone()
    concept, guide, kept = torch.randn(1, 8), torch.randn(1, 8), torch.randn(2, 8)
    uce_edit(unet, concept, guide, kept, UCEConfig(lamb=1e-3, erase_scale=1.0, preserve_scale=1.0))
    new = unet.attn2.to_v.weight
    assert torch.allclose(concept @ new.T, guide @ old.T, atol=1e-3)
    assert torch.allclose(kept @ new.T, kept @ old.T, atol=1e-3)
    assert not torch.allclose(concept @ new.T, concept @ old.T, atol=1e-1)


def test_the_last_word_is_found_as_the_reference_finds_it(sd_task):
    tokenizer = sd_task.tokenizer
    for prompt in ["a photo of a cat", "a photo", ""]:
        mask = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").attention_mask
        assert last_word_index(tokenizer, prompt) == mask.sum().item() - 2
    assert last_word_index(tokenizer, "") == 0  # "" guides towards the start token's embedding, as the reference's does


@pytest.mark.parametrize("tokens", ["last", "last-onward"])
def test_uce_on_a_stable_diffusion_unet_edits_cross_attention_only_and_maps_each_concept_onto_the_anchor(
        sd_task, accelerator, tokens):
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    concepts, guides, kept = edit_rows(sd_task, PROMPTS.forget, ["a photo"] * 2, PROMPTS.remain, tokens)
    drifts = {}
    for preserve in ("retained", "none"):
        result = gu.unlearn(sd_task, split, "uce", accelerator=accelerator, preserve=preserve, tokens=tokens)
        before, after = sd_task.model.state_dict(), result.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"{name}.weight" for name in cross_attention_projections(sd_task.model)}
        assert result.info["guide"] == "a photo" and result.info["concepts"] == PROMPTS.forget and result.steps == 0
        for name, layer in cross_attention_projections(sd_task.model).items():
            edited = dict(result.model.named_modules())[name]
            with torch.no_grad():
                moved = (edited(concepts) - layer(guides)).norm() / (layer(concepts) - layer(guides)).norm()
                drifts[preserve, name] = ((edited(kept) - layer(kept)).norm() / layer(kept).norm()).item()
            assert moved < 0.6, (name, moved)  # at least 40% of the way to the guide, held back by the preserved rows
    for name in cross_attention_projections(sd_task.model):  # the preserved prompts' term holds their outputs
        assert drifts["retained", name] < 0.5 * drifts["none", name], (name, drifts)


def test_every_embedding_row_comes_from_the_pipelines_own_encoding(sd_task):
    tokenizer = sd_task.tokenizer
    embeds = prompt_embeddings(sd_task, ["a photo of a cat", "a photo"])
    concepts, guides, _ = edit_rows(sd_task, ["a photo of a cat"], ["a photo"], [], "last-onward")
    first, first_guide = last_word_index(tokenizer, "a photo of a cat"), last_word_index(tokenizer, "a photo")
    assert torch.equal(concepts[0], embeds[0, first]) and torch.equal(guides[0], embeds[1, first_guide])
    assert len(concepts) == len(guides) == embeds.shape[1] - max(first, first_guide)


def test_uce_refuses_a_denoiser_without_unet_cross_attention(accelerator):
    task = gu.concept_task(tiny_stable_diffusion_3(PROMPTS.table), PROMPTS, per_prompt=2, steps=2, guidance=3.0,
                           accelerator=accelerator)
    with pytest.raises(UserError, match="cross-attention projections"):
        gu.unlearn(task, gu.forget_split(task, classes=[0]), "uce", accelerator=accelerator)


def test_uce_settings_are_checked():
    with pytest.raises(UserError, match="preserve"):
        UCEConfig(preserve="all")
    with pytest.raises(UserError, match="tokens"):
        UCEConfig(tokens="first")


def test_reces_adversarial_embedding_solves_its_least_squares_problem():
    torch.manual_seed(2)
    edited, original = [nn.Linear(6, 4, bias=False) for _ in range(3)], [nn.Linear(6, 4, bias=False) for _ in range(3)]
    concept = torch.randn(5, 6)
    found = adversarial_embedding(edited, original, concept, regular_scale=0.1).double()
    gradient = 0.1 * found  # ∂/∂c' of Σ_l ‖W'_l c' − W_l c‖² + r‖c'‖², halved, is zero at the minimum
    for new, old in zip(edited, original):
        w_new, w_old = new.weight.detach().double(), old.weight.detach().double()
        gradient += (found @ w_new.T - concept.double() @ w_old.T) @ w_new
    assert gradient.abs().max() < 1e-5


def test_rece_starts_from_uce_and_its_rounds_edit_cross_attention_only(sd_task, accelerator):
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    start = gu.unlearn(sd_task, split, "uce", accelerator=accelerator, guide="", tokens="last-onward").model.state_dict()
    without_rounds = gu.unlearn(sd_task, split, "rece", accelerator=accelerator, rounds=0).model.state_dict()
    assert all(torch.equal(start[k], without_rounds[k]) for k in start)
    result = gu.unlearn(sd_task, split, "rece", accelerator=accelerator)
    after = result.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {f"{name}.weight" for name in cross_attention_projections(sd_task.model)}
    assert result.info["rounds"] == 3 and result.steps == 0


def test_uce_adv_without_rounds_is_uce_with_the_retain_prompts_preserved(sd_task, accelerator):
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    plain = gu.unlearn(sd_task, split, "uce", accelerator=accelerator, preserve="retained").model.state_dict()
    none = gu.unlearn(sd_task, split, "uce_adv", accelerator=accelerator, rounds=0).model.state_dict()
    assert all(torch.equal(plain[k], none[k]) for k in plain)


def test_uce_adv_erases_each_adversarial_context_it_finds_in_cross_attention_only(sd_task, accelerator):
    """Two rounds of two contexts per concept: four rows more per concept, found by attacks seeded by the run's seed,
    and the edit stays UCE's (only the cross-attention keys and values move) but differs from UCE's alone."""
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    settings = {"rounds": 2, "contexts": 2, "attack_steps": 2, "ddim_steps": 2}
    result = gu.unlearn(sd_task, split, "uce_adv", accelerator=accelerator, **settings)
    assert result.info["adversarial_rows"] == 2 * 2 * len(PROMPTS.forget)
    before, after = sd_task.model.state_dict(), result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight" for name in cross_attention_projections(sd_task.model)}
    plain = gu.unlearn(sd_task, split, "uce_adv", accelerator=accelerator, rounds=0).model.state_dict()
    assert any(not torch.equal(plain[k], after[k]) for k in changed)
    again = gu.unlearn(sd_task, split, "uce_adv", accelerator=accelerator, **settings).model.state_dict()
    other_seed = gu.unlearn(sd_task, split, "uce_adv", accelerator=accelerator, seed=1, **settings).model.state_dict()
    assert all(torch.equal(again[k], after[k]) for k in after)
    assert any(not torch.equal(other_seed[k], after[k]) for k in changed)
