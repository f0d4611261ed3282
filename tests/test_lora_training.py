"""LoRA training (``lora_rank``): only the factors train, the output is the original's architecture with a rank-r
change in the scope's layers alone (for SalUn and SFR-on, the layers their mask concentrates in)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import genunlearn as gu
from genunlearn.engine.lora_training import merged_lora, with_lora
from genunlearn.models.tiny_sd3 import tiny_stable_diffusion_3

PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat"], remain=["a photo of a dog", "a photo of a car"])


@pytest.fixture(scope="module")
def sd3_task(accelerator):
    return gu.concept_task(tiny_stable_diffusion_3(PROMPTS.table), PROMPTS, per_prompt=4, steps=2, guidance=3.0,
                           accelerator=accelerator)


def test_merging_the_factors_computes_what_the_adapted_layers_compute():
    original = nn.Sequential(nn.Linear(4, 5), nn.Conv2d(2, 3, 3))
    adapted = with_lora(copy.deepcopy(original), ["0", "1"], 2, seed=0)
    assert all(("lora_" in name) == p.requires_grad for name, p in adapted.named_parameters())
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # B starts at zero (the model as it was); any trained value
    merged = merged_lora(adapted, original)
    x, image = torch.randn(3, 4), torch.randn(1, 2, 5, 5)
    assert torch.allclose(adapted[0](x), merged[0](x), atol=1e-6) and torch.allclose(adapted[1](image), merged[1](image), atol=1e-5)
    assert not torch.allclose(original[0](x), merged[0](x))


@pytest.mark.parametrize("method, scope", [("esd", "cross-attention"), ("finetune", None)])
def test_a_lora_run_changes_the_scopes_layers_by_a_rank_r_update_only(method, scope, sd3_task, accelerator):
    split = gu.forget_split(sd3_task, classes=PROMPTS.groups()["forget"])
    settings = {"steps": 2, "batch_size": 2, "lr": 1e-2, "lora_rank": 2,
                **({"ddim_steps": 2, "scope": scope} if method == "esd" else {})}
    result = gu.unlearn(sd3_task, split, method, accelerator=accelerator, **settings)
    before, after = sd3_task.model.state_dict(), result.model.state_dict()
    assert after.keys() == before.keys()  # the original's architecture: the factors are merged
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # biases and norms stay
    if scope == "cross-attention":
        assert all(".attn." in k for k in changed)
    assert all(torch.linalg.matrix_rank((after[k] - before[k]).flatten(1).double(), atol=1e-6) <= 2 for k in changed)
    lora = result.info["lora"]
    assert lora["rank"] == 2 and 0 < lora["trainable_parameters"] < lora["full_parameters"]


@pytest.mark.parametrize("method", ["sfron", "salun"])
def test_masked_methods_train_lora_factors_in_the_layers_their_mask_concentrates_in(method, sd3_task, accelerator):
    split = gu.forget_split(sd3_task, classes=PROMPTS.groups()["forget"])
    settings = {"steps": 2, "batch_size": 2, "lr": 1e-2, "lora_rank": 2, **({"epochs": None} if method == "salun" else {})}
    result = gu.unlearn(sd3_task, split, method, accelerator=accelerator, **settings)
    full = gu.unlearn(sd3_task, split, method, accelerator=accelerator, **{**settings, "lora_rank": None, "lr": 1e-12})
    mask = {k: v for k, v in zip(*mask_of(method, sd3_task, split, accelerator))}
    overall = sum(v.sum().item() for v in mask.values()) / sum(v.numel() for v in mask.values())
    expected = {f"{name}.weight" for name, module in sd3_task.model.named_modules()
                if isinstance(module, (nn.Linear, nn.Conv2d)) and mask[f"{name}.weight"].float().mean().item() >= overall}
    before, after = sd3_task.model.state_dict(), result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= expected and len(expected) < len([k for k in before if k.endswith(".weight")])
    assert result.info["lora"]["targets"] == "the mask's modules" and result.info["lora"]["layers"] == len(expected)
    assert all(torch.linalg.matrix_rank((after[k] - before[k]).flatten(1).double(), atol=1e-6) <= 2 for k in changed)
    assert full.info["mask_kept_fraction"] == pytest.approx(overall)


def mask_of(method: str, task, split, accelerator):
    """``(names, keep)`` of the method's mask on ``task`` at the settings above."""
    from genunlearn.methods import salun, sfron
    from genunlearn.methods.registry import get_method

    cfg = get_method(method).make_config({"steps": 2, "batch_size": 2, **({"epochs": None} if method == "salun" else {})})
    mask, _ = (sfron.sfron_mask if method == "sfron" else salun.salun_mask)(task, split, cfg, accelerator)
    return mask.names, mask.keep