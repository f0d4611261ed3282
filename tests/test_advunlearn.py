"""AdvUnlearn: what each variant trains, the reference's attack optimiser and retain batches, resuming, and the
pipeline, attacks and refusals around a text encoder the erasure trained."""

from __future__ import annotations

import pytest
import torch

import genunlearn as gu
from helpers import tiny_sd15_pipeline
from genunlearn.methods.advunlearn_parts import accumulated_adam, retain_ids
from genunlearn.models.prompt_sampling import erased_model, sd_pipeline_for
from genunlearn.tasks.text_to_image import TextConditioned

PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat", "a photo of a bird"], remain=["a photo of a dog", "a photo of a car"])
TINY = {"steps": 3, "warmup": 1, "attack_steps": 2, "ddim_steps": 2, "lr": 1e-3, "retain_batch": 2}


@pytest.fixture(scope="module")
def sd_task(accelerator):
    return gu.concept_task(tiny_sd15_pipeline(PROMPTS.table), PROMPTS, per_prompt=2, steps=2, guidance=3.0,
                           accelerator=accelerator)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_the_text_encoder_variant_trains_the_encoders_layers_only_and_the_pipeline_carries_it(sd_task, accelerator):
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    result = gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, **TINY)
    assert isinstance(result.model, TextConditioned)
    assert changed(sd_task.model.state_dict(), result.model.denoiser.state_dict()) == set()
    encoder = changed(sd_task.text_encoder.state_dict(), result.model.text_encoders[0].state_dict())
    assert encoder and all(k.startswith(("encoder.", "final_layer_norm.")) for k in encoder)
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())
    pipeline = sd_pipeline_for(sd_task, result.model)
    assert pipeline.text_encoder is result.model.text_encoders[0] and pipeline.unet is result.model.denoiser
    assert isinstance(erased_model(pipeline, sd_task.text_encoders), TextConditioned)
    assert erased_model(sd_pipeline_for(sd_task), sd_task.text_encoders) is sd_task.model


@pytest.mark.parametrize("scope", ["non-cross-attention", "cross-attention"])
def test_the_unet_variant_trains_esds_scope_only(sd_task, accelerator, scope):
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    result = gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, train="unet", scope=scope, **TINY)
    assert not isinstance(result.model, TextConditioned)
    allowed = {name for name, _ in sd_task.trainable_parameters(sd_task.model, scope)}
    moved = changed(sd_task.model.state_dict(), result.model.state_dict())
    assert moved and moved <= allowed


def test_the_adversarial_prompt_resumes_with_the_weights(sd_task, accelerator, tmp_path):
    """Four iterations straight against two, a checkpoint, and two more: the attack's latest prompt is in it."""
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    four = {**TINY, "steps": 4}
    straight = gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, **four).model.state_dict()
    gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, checkpoint_dir=tmp_path, checkpoint_every=2, **four)
    resumed = gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, checkpoint_dir=tmp_path, resume=True,
                         checkpoint_every=2, **four).model.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_attack_steps_adam_on_the_gradients_summed_so_far_and_returns_its_last_evaluated_prompt():
    target, start = torch.tensor([1.0, -2.0, 0.5]), torch.zeros(3)
    loss_of = lambda x: ((x - target) ** 2 * torch.tensor([1.0, 3.0, 0.1])).sum()  # noqa: E731
    found, _ = accumulated_adam(start, loss_of, 3, 0.1)
    by_hand, summed = start.clone().requires_grad_(True), torch.zeros(3)
    zeroed = start.clone().requires_grad_(True)
    adam, plain = torch.optim.Adam([by_hand], lr=0.1), torch.optim.Adam([zeroed], lr=0.1)
    for _ in range(3):  # the prompts the third loss is computed at are what the reference returns
        used, unzeroed = by_hand.detach().clone(), zeroed.detach().clone()
        summed += torch.autograd.grad(loss_of(by_hand), by_hand)[0]
        by_hand.grad = summed.clone()
        adam.step()
        zeroed.grad = torch.autograd.grad(loss_of(zeroed), zeroed)[0]
        plain.step()
    assert torch.allclose(found, used) and not torch.allclose(found, unzeroed)


def test_retain_batches_draw_every_prompt_once_per_round_and_all_when_fewer_than_a_batch():
    prompts = list(range(10, 20))
    first_round = torch.cat([retain_ids(prompts, 5, i, seed=0) for i in (0, 1)])
    assert sorted(first_round.tolist()) == prompts
    assert not torch.equal(first_round, torch.cat([retain_ids(prompts, 5, i, seed=0) for i in (2, 3)]))
    assert sorted(retain_ids(prompts[:3], 5, 7, seed=1).tolist()) == prompts[:3]
    assert len(set(retain_ids(prompts[:9], 5, 4, seed=2).tolist())) == 5


def test_advunlearn_refuses_what_it_cannot_do(accelerator, sd_task, tmp_path):
    from genunlearn.kinds.text_to_image import TextToImageKind
    from genunlearn.runs.job import ForgetJob

    job = ForgetJob(model="sd-digits", method="advunlearn", output_dir=tmp_path, concepts=["a handwritten digit three"],
                    export_lora_rank=4)
    with pytest.raises(gu.UserError, match="advunlearn trains the text encoder"):
        TextToImageKind().check_job(job)
    split = gu.forget_split(sd_task, classes=PROMPTS.groups()["forget"])
    with pytest.raises(gu.UserError, match="text-encoder or unet"):
        gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, train="vae")
    with pytest.raises(gu.UserError, match="batch_size must be 1"):
        gu.unlearn(sd_task, split, "advunlearn", accelerator=accelerator, batch_size=2)
