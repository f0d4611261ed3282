"""LoRA training (``lora_rank``): only the factors train, the output is the original's architecture with a rank-r
change in the scope's layers alone, and the methods whose masks select single weights refuse it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import genunlearn as gu
from genunlearn.engine.lora_training import merged_lora, with_lora
from genunlearn.errors import UserError
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
def test_masked_methods_refuse_lora_training(method, sd3_task, accelerator):
    split = gu.forget_split(sd3_task, classes=PROMPTS.groups()["forget"])
    with pytest.raises(UserError, match="does not train LoRA adapters"):
        gu.unlearn(sd3_task, split, method, accelerator=accelerator, steps=2, lora_rank=2)
