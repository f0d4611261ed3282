"""Attacks on a concept erasure: each one's computation written out by hand on a tiny Stable Diffusion pipeline, the
settings checked before anything runs, and (slow) what they do to a weak and to no erasure of sd-digits."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import genunlearn as gu
from genunlearn.attacks import AttackJudge, attack_configs, run_attacks
from genunlearn.attacks.ring_a_bell import RingABellConfig, concept_vector
from genunlearn.attacks.unlearndiffatk import SampledOneHot, UnlearnDiffAtkConfig, simplex_projection
from genunlearn.models.prompt_prefix import with_prefix
from genunlearn.cli import guarded, main
from genunlearn.errors import UserError
from genunlearn.models.prompt_sampling import sd_pipeline_for
from genunlearn.storage.pipeline_folder import save_pipeline
from helpers import tiny_sd15_pipeline

ring_a_bell_module = importlib.import_module("genunlearn.attacks.ring_a_bell")  # the package exports its function by that name
PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat"], remain=["a photo of a dog", "a photo of a car"],
                            paraphrase=["a cat"])


@pytest.fixture(scope="module")
def sd_task(accelerator):
    return gu.concept_task(tiny_sd15_pipeline(PROMPTS.table), PROMPTS, per_prompt=2, steps=2, guidance=3.0,
                           accelerator=accelerator)


def constant_judge(class_id: int, classes: int = 10) -> torch.nn.Module:
    """A judge that sees class ``class_id`` in every image."""
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(classes))
    judge(torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        judge[1].weight.zero_()
        judge[1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(class_id), classes).float())
    return judge


def attack_judge(task, accelerator, judge=None) -> AttackJudge:
    groups = PROMPTS.groups()
    return AttackJudge(task, judge or constant_judge(0), ["cat", "dog", "car"], groups["forget"], groups["paraphrase"],
                       groups["remain"], per_prompt=2, guidance=3.0, steps=2, seed=0, accelerator=accelerator)


def test_the_simplex_projection_is_the_euclidean_one_the_reference_bisects_for():
    torch.manual_seed(0)
    rows = torch.randn(4, 7) * 2
    projected = simplex_projection(rows)
    assert torch.allclose(projected.sum(-1), torch.ones(4)) and (projected >= 0).all()
    for row, mine in zip(rows, projected):  # the reference: find mu with sum(clip(a - mu, 0, 1)) = 1 by bisection
        low, high = (row.min() - 1).item(), row.max().item()
        for _ in range(100):
            mu = (low + high) / 2
            low, high = (mu, high) if (row - mu).clamp(0, 1).sum() > 1 else (low, mu)
        assert torch.allclose(mine, (row - mu).clamp(0, 1), atol=1e-5)
    assert torch.allclose(simplex_projection(projected), projected, atol=1e-6)  # a point on the simplex stays


def test_tokens_are_drawn_from_the_run_seed_and_the_gradient_passes_as_a_hardtanh():
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]], requires_grad=True)
    draws = [SampledOneHot.apply(weights, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0][0].tolist() == [0.0, 1.0, 0.0] and draws[0][1, 1] == 0
    (draws[0] * torch.tensor([[3.0, -0.5, 0.2], [-2.0, 0.1, 1.5]])).sum().backward()
    assert torch.equal(weights.grad, torch.tensor([[1.0, -0.5, 0.2], [-1.0, 0.1, 1.0]]))


def test_the_prefix_goes_after_the_start_token_and_the_sequence_keeps_its_length():
    ids = torch.tensor([49406, 5, 6, 7, 49407, 49407, 49407])
    assert with_prefix(ids, torch.tensor([1, 2])).tolist() == [49406, 1, 2, 5, 6, 7, 49407]


def test_ring_a_bell_adds_its_concept_vector_to_every_attacked_prompts_encoding(sd_task, accelerator, monkeypatch):
    encode = lambda prompts: sd_task.encode_tokens(sd_task.text_encoders, sd_task.prompt_tokens(prompts))["encoder_hidden_states"]
    vector = concept_vector(sd_task, PROMPTS.forget, PROMPTS.remain)
    with torch.no_grad():
        expected = encode(PROMPTS.forget).mean(0) - encode(PROMPTS.remain).mean(0)
    assert torch.allclose(vector, expected, atol=1e-6)
    seen = []

    def capture(pipeline, embeds, prompt_id, count, **options):
        seen.append((prompt_id, embeds.clone()))
        return torch.zeros(count, 3, 32, 32)

    monkeypatch.setattr(ring_a_bell_module, "generate_from_embeddings", capture)
    outcome = ring_a_bell_module.ring_a_bell(attack_judge(sd_task, accelerator), sd_task.model, RingABellConfig(strength=2.5))
    assert [prompt_id for prompt_id, _ in seen] == [0, 0, 3, 3]  # the erased prompt and its paraphrase, plain then attacked
    for (_, plain), (_, attacked) in zip(seen[::2], seen[1::2]):
        assert torch.allclose(attacked - plain, 2.5 * vector[None], atol=1e-5)
    assert (outcome.pre_asr, outcome.post_asr, outcome.samples) == (1.0, 1.0, 4)  # the judge sees a cat everywhere


def test_unlearndiffatk_counts_an_image_its_plain_prompt_already_shows_and_leaves_the_model_trainable(sd_task, accelerator):
    model = sd_task.model
    outcome = run_attacks(attack_judge(sd_task, accelerator), model, attack_configs(["unlearndiffatk"], {}), None)["unlearndiffatk"]
    assert outcome["pre_asr"] == outcome["post_asr"] == 1.0 and outcome["iterations_run"] == 0 and outcome["samples"] == 16
    assert all(p.requires_grad for p in model.parameters())


def test_unlearndiffatk_optimises_its_tokens_when_the_concept_is_not_seen(sd_task, accelerator):
    cfg = attack_configs(["unlearndiffatk"], {"unlearndiffatk.iterations": 2, "unlearndiffatk.timesteps": 2,
                                             "unlearndiffatk.images": 1})
    outcome = run_attacks(attack_judge(sd_task, accelerator, constant_judge(1)), sd_task.model, cfg, None)["unlearndiffatk"]
    assert outcome["pre_asr"] == outcome["post_asr"] == 0.0 and outcome["iterations_run"] == 2 * 2 * 2  # 2 prompts
    assert len(outcome["adversarial_prompts"]) == 2 and all(p["prompt"].endswith("cat") for p in outcome["adversarial_prompts"])
    assert outcome["budget"]["tokens"] == 3 and outcome["seconds"] > 0


def test_attack_settings_are_checked_before_anything_runs():
    assert attack_configs(["relearn"], {"relearn.steps": 5})["relearn"].steps == 5
    for names, settings, message in ((["nope"], {}, "unknown attack"), (["relearn"], {"relearn.epochs": 2}, "no setting"),
                                     (["relearn"], {"ringabell.strength": 2.0}, "not among the attacks"),
                                     (["ringabell"], {"ringabell.strength": -1.0}, "positive"),
                                     (["unlearndiffatk"], {"unlearndiffatk.tokens": 0}, "tokens")):
        with pytest.raises(UserError, match=message):
            attack_configs(names, settings)
    with pytest.raises(UserError):
        UnlearnDiffAtkConfig(lr=0)


def test_attacks_on_a_classifier_or_without_a_pipeline_to_attack_are_refused_in_one_line(cnn_task, capsys):
    assert guarded(main, ["forget", "--model", "cnn-digits", "--class", "3", "--attack", "relearn"]) == 2
    assert "--attack are for text-to-image models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attack", "--model", "sd-digits", "--concept", "a handwritten digit three", "--attack", "relearn"])
    assert "--attacked" in capsys.readouterr().err


@pytest.mark.slow
def test_attacks_bring_a_weakly_erased_concept_back_and_find_an_unerased_one_everywhere(tmp_path):
    """sd-digits (pretrained on first use): UCE at 0.3 of its erase scale hides "three" in three quarters of the samples
    (a tenth hides nothing); the attacks raise its success rate above the plain prompt's, and on the original model
    the concept is found in nearly every sample."""
    concept = ["--model", "sd-digits", "--concept", "a handwritten digit three", "--eval-samples", "20"]
    assert guarded(main, ["forget", *concept, "--method", "uce", "--set", "erase_scale=0.3", "--set", "preserve=retained",
                          "--output-dir", str(tmp_path / "weak")]) == 0
    budget = ["--attack-set", "unlearndiffatk.iterations=10", "--attack-set", "unlearndiffatk.timesteps=5",
              "--attack-set", "unlearndiffatk.images=4"]
    for attacked in ("weak", "original"):
        folder = tmp_path / "weak" / "pipeline" if attacked == "weak" else tmp_path / "original"
        if attacked == "original":  # the cached original, saved as a pipeline folder
            save_pipeline(sd_pipeline_for(gu.load_task("sd-digits")), folder)
        assert guarded(main, ["attack", *concept, "--attacked", str(folder), "--attack", "unlearndiffatk,ringabell,relearn",
                              *budget, "--output-dir", str(tmp_path / f"attack-{attacked}")]) == 0
        attacks = json.loads((tmp_path / f"attack-{attacked}" / "evaluation.json").read_text())["attacks"]
        if attacked == "original":
            assert all(a["pre_asr"] >= 0.9 and a["post_asr"] >= 0.9 for a in attacks.values()), attacks
        else:
            assert attacks["relearn"]["post_asr"] > attacks["relearn"]["pre_asr"] + 0.2, attacks
            assert attacks["unlearndiffatk"]["post_asr"] > attacks["unlearndiffatk"]["pre_asr"], attacks
