"""Text-to-image foundations: the offline tiny Stable Diffusion pipeline and the captioned digits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from torch import nn

from genunlearn.data.captioned_digits import (CAPTIONS, DIGIT_WORDS, PHRASINGS, STYLES, VOCABULARY, caption_images,
                                             captioned_digits_split, styled)
from genunlearn.data.digits import load_digits_split
from genunlearn.data.generated import generated_prompt_datasets
from genunlearn.api import unlearn
from genunlearn.data.split import SplitSpec, make_forget_split
from genunlearn.engine.objectives import random_label
from genunlearn.errors import UserError
from genunlearn.eval.concepts import concept_metrics, evaluate_concepts, prompt_class, retain_reference
from genunlearn.eval.fid import ClassifierFeatures, extract_features
from genunlearn.methods.esd import esd_target, sampling_schedule
from genunlearn.noise import NoiseSource
from genunlearn.models.presets import TrainRecipe, get_preset
from genunlearn.models.prompt_sampling import sample_prompts, sd_pipeline_for
from genunlearn.models.text_to_image_loading import load_text_to_image_pipeline
from genunlearn.models.tiny_sd import build_tiny_sd
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.text_to_image import TextToImageTask
from helpers import accelerate_launch

SD_DIGITS = get_preset("sd-digits")


@pytest.fixture(scope="module")
def tiny_sd() -> StableDiffusionPipeline:
    return build_tiny_sd(VOCABULARY, **SD_DIGITS.model_args)


def test_every_caption_word_is_one_token_and_the_empty_prompt_is_bos_then_eos(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    for word in VOCABULARY:
        assert tokenizer(word).input_ids == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(word + "</w>"),
                                             tokenizer.eos_token_id], word
    text = "a handwritten digit three in bold strokes"
    assert len(tokenizer(text).input_ids) == len(text.split()) + 2
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert empty == [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (tokenizer.model_max_length - 1)


def test_the_tiny_pipeline_saves_and_reloads_offline_bit_for_bit(tiny_sd, tmp_path):
    assert sum(p.numel() for p in tiny_sd.unet.parameters()) == 985_444  # the spec's UNet
    assert sum(p.numel() for n, p in tiny_sd.unet.named_parameters() if "attn2" in n) == 49_408
    save_pipeline(tiny_sd, tmp_path / "sd")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        saved, back = getattr(tiny_sd, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), name
    assert loaded.tokenizer.get_vocab() == tiny_sd.tokenizer.get_vocab()

    def sample(pipeline):
        return pipeline(["a handwritten digit three", "the number 7 with inverted colours"], height=8, width=8,
                        num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images

    assert torch.equal(sample(tiny_sd), sample(loaded))


def test_captioned_digits_label_each_image_with_its_digit_phrasing_and_style():
    plain_train, _ = load_digits_split()
    train, test = captioned_digits_split(seed=0)
    assert (len(train), len(test)) == (1437, 360) and train.classes == list(CAPTIONS)
    assert len(CAPTIONS) == 10 * len(PHRASINGS) * len(STYLES) == len(set(CAPTIONS))
    for index in range(0, len(train), 97):
        text = CAPTIONS[train.targets[index]]
        digit = int(plain_train.targets[index])
        assert DIGIT_WORDS[digit] in text.split() or str(digit) in text.split()
        style = next((s for s, suffix in STYLES.items() if suffix and text.endswith(suffix)), "plain")
        assert torch.equal(train.images[index], styled(plain_train.images[index : index + 1], style)[0])
    styles = (train.targets % len(STYLES)).bincount(minlength=len(STYLES))
    assert styles.min() > 300  # every style drawn about a quarter of the time
    again, _ = captioned_digits_split(seed=0)
    assert torch.equal(again.targets, train.targets)


def test_styles_do_what_their_names_say():
    images = load_digits_split()[0].images[:50]
    ink = {style: (styled(images, style) + 1) / 2 for style in STYLES}
    assert torch.allclose(ink["inverted"], 1 - ink["plain"])
    assert (ink["bold"] >= ink["plain"] - 1e-6).all() and ink["bold"].mean() > ink["plain"].mean() + 0.05
    assert (ink["thin"] <= ink["plain"] + 1e-6).all() and ink["thin"].mean() < ink["plain"].mean() - 0.05


def test_a_captions_real_images_are_every_digit_of_its_digit_in_its_style():
    threes = torch.cat([part.images[part.targets == 3] for part in load_digits_split()])
    assert torch.equal(caption_images("a handwritten digit three"), threes)  # plain: the digits as they are
    assert torch.equal(caption_images("the number 3 in bold strokes"), styled(threes, "bold"))
    assert len(threes) == 183 and caption_images("a photo of a cat") is None


@pytest.fixture(scope="module")
def sd_task(tiny_sd) -> TextToImageTask:
    train, test = captioned_digits_split(seed=0)
    return TextToImageTask(SD_DIGITS, tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer,
                           DDPMScheduler(beta_schedule="squaredcos_cap_v2"), train, test)


def noise_draws(task: TextToImageTask, images: torch.Tensor, seed: int):
    """``task.noised``'s draws for ``images`` under ``seed``: what the losses below see after the same seeding."""
    torch.manual_seed(seed)
    return task.noised(images)


def test_prompt_embeddings_are_the_pipelines_own(sd_task, tiny_sd):
    prompts = [sd_task.prompts[5], ""]
    expected, _ = tiny_sd.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    labels = torch.tensor([5, sd_task.null_prompt])
    assert torch.allclose(sd_task.condition(labels, torch.device("cpu")), expected, atol=1e-6)


def test_the_salun_mask_objective_and_rl_are_their_formulas(sd_task):
    unet = sd_task.model.eval()
    images, labels = sd_task.train_data.images[:4], sd_task.train_data.targets[:4]
    noisy, noise, timesteps = noise_draws(sd_task, images, 3)
    with torch.no_grad():
        def eps(ids):
            return unet(noisy, timesteps, encoder_hidden_states=sd_task.prompt_embeddings[ids]).sample

        null = torch.full_like(labels, sd_task.null_prompt)
        guided = 8.5 * eps(labels) - 7.5 * eps(null)  # (1 + w) ε(x_t, c) - w ε(x_t, ∅), w = 7.5
        torch.manual_seed(3)
        assert torch.allclose(sd_task.importance_loss(unet, (images, labels)), (guided - noise).pow(2).mean(dim=(1, 2, 3)),
                              rtol=1e-5)
        anchor = torch.full_like(labels, 7)
        torch.manual_seed(3)
        expected = (eps(labels) - eps(anchor)).pow(2).mean(dim=(1, 2, 3))
        assert torch.allclose(sd_task.random_label_loss(unet, (images, labels), anchor), expected, rtol=1e-5)
        torch.manual_seed(3)
        assert torch.allclose(sd_task.loss(unet, (images, labels)), (eps(labels) - noise).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5)


def test_esd_parameter_scopes(sd_task):
    unet = sd_task.model
    cross = dict(sd_task.trainable_parameters(unet, "cross-attention"))
    noxattn = dict(sd_task.trainable_parameters(unet, "non-cross-attention"))  # train-esd.py's ESD-u
    linear = dict(sd_task.trainable_parameters(unet, "linear-non-cross-attention"))  # esd_sd.py's ESD-u
    assert sum(p.numel() for p in cross.values()) == 49_408 and all("attn2" in name for name in cross)
    assert not set(cross) & set(noxattn) and not set(cross) & set(linear)
    assert "conv_out.weight" in linear and "time_embedding.linear_1.weight" in linear and not any("norm" in n for n in linear)
    # noxattn: everything but attn2, CompVis's time_embed (diffusers' time_embedding) and out.0/out.2 (conv_norm_out,
    # conv_out); the blocks' norms and time projections (CompVis emb_layers) train
    assert set(noxattn) == {n for n, _ in unet.named_parameters() if "attn2" not in n
                            and not n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))}
    assert any("norm" in n for n in noxattn) and any("time_emb_proj" in n for n in noxattn)
    assert not {"conv_out.weight", "time_embedding.linear_1.weight", "conv_norm_out.weight"} & set(noxattn)
    assert len(dict(unet.named_parameters())) == len(sd_task.trainable_parameters(unet, "all"))
    with pytest.raises(UserError, match="unknown parameter scope"):
        sd_task.trainable_parameters(unet, "attn1")


def test_the_esd_target_is_the_same_in_both_references_conventions():
    unconditional, conditional = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.0, -2.0])
    for eta in (1.0, 0.5, 3.0):
        compvis = unconditional - eta * (conditional - unconditional)  # train-esd.py
        diffusers_script = conditional - (eta + 1) * (conditional - unconditional)  # esd_sd.py's η' = η + 1
        assert torch.allclose(esd_target(unconditional, conditional, eta), compvis)
        assert torch.allclose(esd_target(unconditional, conditional, eta), diffusers_script)
    assert torch.equal(esd_target(unconditional, conditional, 1.0), torch.tensor([-0.5, -2.0, 6.0]))  # by hand: 2∅ - c


class FixedDraws:
    """A stand-in noise source whose shared integer draws are given in advance."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def shared_randint(self, high: int) -> int:
        value = self.values.pop(0)
        assert 0 <= value < high
        return value


def test_esd_timestep_labels_follow_each_reference():
    """train-esd.py (CompVis ddim.py): t_enc in [0, 50), the sampler stops after min(50, 51 - t_enc) steps and the label is
    uniform in [20 t_enc, 20 t_enc + 20); esd_sd.py: k steps, labelled with the timestep reached."""
    timesteps = torch.arange(981, 0, -20)  # 50 DDIM steps of a 1000-step schedule, steps_offset 1
    assert sampling_schedule(FixedDraws(10, 7), 50, 1000, "compvis", timesteps) == (41, 207)
    assert sampling_schedule(FixedDraws(0, 19), 50, 1000, "compvis", timesteps) == (50, 19)  # t_enc 0 and 1: every step
    assert sampling_schedule(FixedDraws(1, 0), 50, 1000, "compvis", timesteps) == (50, 20)
    assert sampling_schedule(FixedDraws(49, 19), 50, 1000, "compvis", timesteps) == (2, 999)  # never pure noise
    assert sampling_schedule(FixedDraws(0), 50, 1000, "reached", timesteps) == (0, 981)  # pure noise at 981
    assert sampling_schedule(FixedDraws(10), 50, 1000, "reached", timesteps) == (10, 781)
    # CompVis x_t after 51 - t_enc steps sits at timestep 20 t_enc - 39: the label is 39 to 58 steps noisier
    steps, label = sampling_schedule(FixedDraws(10, 7), 50, 1000, "compvis", timesteps)
    assert int(timesteps[steps]) == 20 * 10 - 39 and 39 <= label - int(timesteps[steps]) <= 58
    draws = NoiseSource(0)
    labels = [sampling_schedule(draws, 50, 1000, "compvis", timesteps)[1] for _ in range(5000)]
    assert min(labels) >= 0 and max(labels) <= 999 and len(set(labels)) > 950  # every label reachable


@pytest.mark.parametrize("sample_with", ["trained", "frozen"])
def test_esd_samples_x_t_with_the_model_its_reference_uses(sd_task, accelerator, monkeypatch, sample_with):
    """train-esd.py samples x_t with the model being trained, esd_sd.py with the frozen copy."""
    import genunlearn.methods.esd as esd

    used, original = [], esd.partially_sampled
    monkeypatch.setattr(esd, "partially_sampled", lambda model, *args: used.append(model) or original(model, *args))
    three = CAPTIONS.index("a handwritten digit three")
    split = make_forget_split(sd_task.train_data, sd_task.test_data, SplitSpec("class", classes=(three,)))
    unlearn(sd_task, split, "esd", steps=2, ddim_steps=4, lr=1e-3, sample_with=sample_with, accelerator=accelerator)
    assert len(used) == 2 and used[0] is used[1]
    assert (used[0] is not sd_task.model and used[0].training) == (sample_with == "trained")
    assert (not used[0].training and not any(p.requires_grad for p in used[0].parameters())) == (sample_with == "frozen")


@pytest.mark.parametrize("scope", ["cross-attention", "non-cross-attention", "linear-non-cross-attention"])
def test_esd_trains_its_scope_only_and_needs_no_images(sd_task, scope, accelerator):
    three = CAPTIONS.index("a handwritten digit three")
    split = make_forget_split(sd_task.train_data, sd_task.test_data, SplitSpec("class", classes=(three,)))
    result = unlearn(sd_task, split, "esd", steps=3, ddim_steps=4, lr=1e-3, scope=scope, accelerator=accelerator)
    before, after = dict(sd_task.model.named_parameters()), dict(result.model.named_parameters())
    trained = {name for name, _ in sd_task.trainable_parameters(sd_task.model, scope)}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= trained
    assert len(changed) > 0.5 * len(trained)  # Adam moves nearly every trained tensor in 3 steps
    assert result.info["scope"] == scope and 0 < result.info["trained_fraction"] < 1


def test_esd_resumes_to_the_uninterrupted_weights(sd_task, accelerator, tmp_path):
    three = CAPTIONS.index("a handwritten digit three")
    split = make_forget_split(sd_task.train_data, sd_task.test_data, SplitSpec("class", classes=(three,)))
    four = {"steps": 4, "ddim_steps": 4, "lr": 1e-3, "accelerator": accelerator}
    straight = unlearn(sd_task, split, "esd", **four).model.state_dict()
    unlearn(sd_task, split, "esd", checkpoint_dir=tmp_path, checkpoint_every=2, **four)
    resumed = unlearn(sd_task, split, "esd", checkpoint_dir=tmp_path, resume=True, checkpoint_every=2, **four).model.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_offloading_the_frozen_models_moves_them_not_the_result(sd_task, accelerator, monkeypatch):
    """``offload_frozen``: ESD's teacher runs through accelerate's ``cpu_offload`` hooks and the original waits on the
    CPU during the loop; the erased weights are those of a run without it, and the original is back where it was."""
    import accelerate

    import genunlearn.methods.common as common

    three = CAPTIONS.index("a handwritten digit three")
    split = make_forget_split(sd_task.train_data, sd_task.test_data, SplitSpec("class", classes=(three,)))
    three_steps = {"steps": 3, "ddim_steps": 3, "lr": 1e-3, "accelerator": accelerator}
    offloaded, where = [], []
    hooks = accelerate.cpu_offload
    monkeypatch.setattr(accelerate, "cpu_offload", lambda model, **kw: offloaded.append(kw) or hooks(model, **kw))
    loop = common.run_loop
    monkeypatch.setattr(common, "run_loop", lambda *a, **kw: where.append(next(sd_task.model.parameters()).device) or loop(*a, **kw))
    device = next(sd_task.model.parameters()).device
    plain = unlearn(sd_task, split, "esd", **three_steps).model.state_dict()
    assert offloaded == [] and where == [device]
    moved = unlearn(sd_task, split, "esd", offload_frozen=True, **three_steps)
    assert offloaded == [{"execution_device": accelerator.device}] and where[1].type == "cpu"
    assert next(sd_task.model.parameters()).device == device
    assert all(torch.equal(plain[k], v) for k, v in moved.model.state_dict().items())


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_pretraining_trains_the_vae_then_the_unet_and_caches_the_pipeline(train_text_encoder, tmp_path, accelerator,
                                                                          monkeypatch):
    import genunlearn.models.text_to_image_loading as loading

    brief = TrainRecipe(epochs=1, batch_size=64, lr=2e-3, optimizer="adamw", weight_decay=0.0)
    preset = dataclasses.replace(SD_DIGITS, vae_train=brief, train=brief, train_text_encoder=train_text_encoder)
    pipeline = load_text_to_image_pipeline(preset, pretrained=None, cache_root=tmp_path, accelerator=accelerator)
    train, _ = captioned_digits_split(seed=0)
    fresh = build_tiny_sd(VOCABULARY, **SD_DIGITS.model_args)
    images = train.images[:256]

    def reconstruction_error(vae):
        torch.manual_seed(0)
        with torch.no_grad():
            return float((vae.decode(vae.encode(images).latent_dist.sample()).sample - images).pow(2).mean())

    assert reconstruction_error(pipeline.vae) < 0.5 * reconstruction_error(fresh.vae)
    torch.manual_seed(1)
    with torch.no_grad():
        scaled = pipeline.vae.encode(train.images).latent_dist.sample() * pipeline.vae.config.scaling_factor
    assert scaled.std() == pytest.approx(1.0, rel=0.05)  # the scaling factor gives unit-variance latents
    assert any(not torch.equal(a, b) for a, b in zip(pipeline.unet.parameters(), fresh.unet.parameters()))
    encoder_as_built = all(torch.equal(a, b) for a, b in zip(pipeline.text_encoder.parameters(), fresh.text_encoder.parameters()))
    assert encoder_as_built != train_text_encoder  # trained with the UNet, or left frozen and random

    monkeypatch.setattr(loading, "pretrain_tiny_sd", lambda *args: pytest.fail("pretrained again instead of loading the cache"))
    again = load_text_to_image_pipeline(preset, pretrained=None, cache_root=tmp_path, accelerator=accelerator)
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(again, part).parameters(), getattr(pipeline, part).parameters()))


def test_rl_pulls_the_concept_towards_the_anchor_prompt(tiny_sd, sd_task, accelerator):
    anchor = "a handwritten digit"
    anchored = TextToImageTask(SD_DIGITS, tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer,
                               sd_task.scheduler, sd_task.train_data, sd_task.test_data, anchor=anchor)
    expected, _ = tiny_sd.encode_prompt([anchor], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.allclose(anchored.condition(torch.tensor([anchored.anchor_prompt]), torch.device("cpu")), expected, atol=1e-6)
    images, labels = sd_task.train_data.images[:3], sd_task.train_data.targets[:3]
    ctx = SimpleNamespace(cfg=SimpleNamespace(rl_shift=None, rl_form="eps_match"))
    unet = anchored.model.eval()
    with torch.no_grad():
        torch.manual_seed(4)
        pulled = random_label(anchored, unet, (images, labels), ctx)
        torch.manual_seed(4)
        towards_anchor = anchored.random_label_loss(unet, (images, labels), torch.full_like(labels, anchored.anchor_prompt)).mean()
    assert torch.equal(pulled, towards_anchor)
    towards_null = TextToImageTask(SD_DIGITS, tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer,
                                   sd_task.scheduler, sd_task.train_data, sd_task.test_data, anchor="")
    cpu = torch.device("cpu")
    assert torch.equal(towards_null.condition(torch.tensor([towards_null.anchor_prompt]), cpu),
                       towards_null.condition(torch.tensor([towards_null.null_prompt]), cpu))  # "" is the ∅ of guidance


def test_without_an_anchor_rl_draws_its_targets_from_the_named_prompts_only(tiny_sd, sd_task):
    retained = [CAPTIONS.index("a handwritten digit four"), CAPTIONS.index("a handwritten digit five")]
    task = TextToImageTask(SD_DIGITS, tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer, sd_task.scheduler,
                           sd_task.train_data, sd_task.test_data, rl_prompts=retained)
    drawn = []
    ctx = SimpleNamespace(cfg=SimpleNamespace(rl_shift=None, rl_form="eps_match"),
                          global_randint=lambda high, size: torch.randint(0, high, (size,)))
    task.random_label_loss = lambda model, batch, labels, form: drawn.append(labels) or torch.zeros(len(labels))
    for _ in range(20):
        random_label(task, task.model, (sd_task.train_data.images[:4], torch.full((4,), 3)), ctx)
    assert set(torch.cat(drawn).tolist()) == set(retained)  # both retained prompts, never another paraphrase of a concept


def test_generations_depend_on_the_seed_and_prompt_only_and_latents_decode_to_the_images(sd_task, accelerator):
    pipeline = sd_pipeline_for(sd_task)
    prompts, settings = sd_task.prompts, {"guidance": 3.0, "steps": 3, "seed": 5}
    both = sample_prompts(pipeline, prompts, [36, 7], 3, accelerator, **settings)
    alone = sample_prompts(pipeline, prompts, [7], 3, accelerator, **settings)
    assert both[7].shape == (3, 1, 8, 8) and torch.equal(both[7], alone[7]) and not torch.equal(both[7], both[36][:3])
    latents = sample_prompts(pipeline, prompts, [7], 3, accelerator, **settings, latents=True)[7]
    assert latents.shape == (3, 4, 8, 8)
    assert torch.allclose(sd_task.decode(latents), both[7], atol=1e-5)
    other_seed = sample_prompts(pipeline, prompts, [7], 3, accelerator, **{**settings, "seed": 6})
    assert not torch.equal(other_seed[7], both[7])


def test_the_models_own_generations_are_cached_latents_labelled_by_prompt(sd_task, accelerator, tmp_path, monkeypatch):
    import genunlearn.data.generated as generated

    pipeline = sd_pipeline_for(sd_task)
    ids = [CAPTIONS.index("a handwritten digit three"), CAPTIONS.index("the number 4")]
    settings = {"guidance": 3.0, "steps": 2, "seed": 0, "cache_dir": tmp_path}
    train, test = generated_prompt_datasets(pipeline, sd_task.prompts, ids, 8, accelerator, **settings)
    assert train.images.shape == (16, 4, 8, 8) and test.images.shape == (4, 4, 8, 8)  # latents; test: a quarter
    assert train.targets.tolist() == [ids[0]] * 8 + [ids[1]] * 8 and train.classes == sd_task.prompts
    assert not torch.equal(train.images[:2], test.images[:2])  # other seeds
    monkeypatch.setattr(generated, "sample_prompts", lambda *a, **k: pytest.fail("generated again instead of reading the cache"))
    again, _ = generated_prompt_datasets(pipeline, sd_task.prompts, ids, 8, accelerator, **settings)
    assert torch.equal(again.images, train.images)
    monkeypatch.undo()
    moved = [prompt for i, prompt in enumerate(sd_task.prompts) if i not in ids] + [sd_task.prompts[i] for i in ids]
    elsewhere, _ = generated_prompt_datasets(pipeline, moved, [len(moved) - 2, len(moved) - 1], 8, accelerator, **settings)
    assert not torch.equal(elsewhere.images, train.images)  # the same prompts at other ids: other seeds, not the cache
    calls = []
    monkeypatch.setattr(generated, "sample_prompts", lambda *a, **k: calls.append(k["seed"]) or {i: train.images[:1] for i in ids})
    generated_prompt_datasets(pipeline, sd_task.prompts, ids, 8, accelerator, **{**settings, "seed": 1})
    original = generated.numerics
    for field, value in (("device_type", "cuda"), ("mixed_precision", "bf16"), ("tf32", True)):
        monkeypatch.setattr(generated, "numerics", lambda acc, field=field, value=value: {**original(acc), field: value})
        generated_prompt_datasets(pipeline, sd_task.prompts, ids, 8, accelerator, **settings)
    assert len(calls) == 2 * 4  # another seed, device type, precision or TF32: generated anew (train and test sets)


def test_a_prompt_asks_for_the_one_class_it_names():
    digits = [str(d) for d in range(10)]
    assert prompt_class("a handwritten digit three", digits) == 3
    assert prompt_class("the number 7 with inverted colours", digits) == 7
    assert prompt_class("a handwritten digit", digits) is None and prompt_class("three or 4", digits) is None
    imagenette = ["tench", "golden retriever", "church"]
    assert prompt_class("Image of golden retriever", imagenette) == 1 and prompt_class("a church at night", imagenette) == 2
    assert prompt_class("a retriever", imagenette) is None
    synonyms = ["tench, Tinca tinca", "English springer, English springer spaniel"]  # timm's ImageNet descriptions
    assert prompt_class("Image of tench", synonyms) == 0 and prompt_class("an English springer spaniel, running", synonyms) == 1
    horns = ["cornet, horn, trumpet, trump", "French horn, horn"]
    assert prompt_class("Image of French horn", horns) == 1 and prompt_class("a horn", horns) is None


def test_concept_metrics_score_each_group_of_prompts_with_the_judge():
    judge = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 10))
    with torch.no_grad():  # the judge says 3 for light images, 5 for dark ones
        judge[2].weight.zero_()
        judge[2].bias.zero_()
        judge[2].weight[3, 0], judge[2].weight[5, 0] = 100.0, -100.0
    three, five, four = (CAPTIONS.index(c) for c in ("a handwritten digit three", "the number 5", "a four written by hand"))
    light, dark = torch.full((6, 1, 8, 8), 0.5), torch.full((6, 1, 8, 8), -0.5)
    generations = {three: light, five: dark, four: dark}
    groups = {"forget": [three], "remain": [five, four]}
    reference = extract_features(torch.cat([dark, light]), ClassifierFeatures(judge))
    metrics = concept_metrics(generations, CAPTIONS, groups, judge, [str(d) for d in range(10)], reference=reference)
    assert metrics["forget_acc"] == 1.0 and metrics["remain_acc"] == 0.5  # the 5s are 5s, the 4s are not 4s
    assert metrics["forget_ink"] == 0.75 and metrics["remain_ink"] == 0.25  # the style measure per group
    assert metrics["per_prompt"]["a handwritten digit three"] == {"class": 3, "ink_level": 0.75, "recognised": 1.0}
    assert metrics["fid_remain"] > 0.1  # all-dark retain generations against a half-light reference
    same = concept_metrics({five: dark, four: light}, CAPTIONS, {"remain": [five, four]}, judge, [str(d) for d in range(10)],
                           reference=reference)
    assert same["fid_remain"] == pytest.approx(0.0, abs=1e-6) and "fid_remain_real" not in same
    real = concept_metrics({five: dark, four: light}, CAPTIONS, {"remain": [five, four]}, judge, [str(d) for d in range(10)],
                           reference=reference, real_reference=extract_features(dark, ClassifierFeatures(judge)))
    assert real["fid_remain"] == pytest.approx(0.0, abs=1e-6) and real["fid_remain_real"] > 0.1  # each its own reference
    prompts = [*CAPTIONS, "a handwritten digit in bold strokes"]  # a style concept: no digit named
    unnamed = concept_metrics({len(CAPTIONS): light}, prompts, {"forget": [len(CAPTIONS)]}, judge, [str(d) for d in range(10)])
    assert unnamed["per_prompt"][prompts[-1]]["recognised"] is None and unnamed["forget_acc"] is None


def test_evaluate_concepts_samples_every_group_and_measures_retain_fid_against_the_originals_other_seeds(sd_task, accelerator):
    judge = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # any classifier of the digits' size will do here
    three, five = CAPTIONS.index("a handwritten digit three"), CAPTIONS.index("the number 5")
    protocol = {"per_prompt": 4, "guidance": 3.0, "steps": 2}
    reference = retain_reference(sd_task, judge, [five], accelerator, **protocol)
    metrics, generations = evaluate_concepts(sd_task, judge, [str(d) for d in range(10)], {"forget": [three], "remain": [five]},
                                             accelerator, reference=reference, **protocol)
    assert sorted(generations) == [three, five] and generations[three].shape == (4, 1, 8, 8)
    assert set(metrics) == {"forget_acc", "forget_ink", "remain_acc", "remain_ink", "fid_remain", "per_prompt"}
    assert metrics["fid_remain"] > 0
    again, _ = evaluate_concepts(sd_task, judge, [str(d) for d in range(10)], {"remain": [five]}, accelerator,
                                 reference=extract_features(generations[five], ClassifierFeatures(judge)), **protocol)
    assert again["fid_remain"] == pytest.approx(0.0, abs=1e-6)  # the same seeds give the same generations


@pytest.mark.parametrize("method", ["salun", "sfron", "finetune"])
def test_the_gradient_methods_run_on_a_text_to_image_task_with_the_references_settings(method, tiny_sd, sd_task, accelerator):
    anchored = TextToImageTask(SD_DIGITS, tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer,
                               sd_task.scheduler, sd_task.train_data, sd_task.test_data, anchor="a handwritten digit")
    split = make_forget_split(anchored.train_data, anchored.test_data,
                              SplitSpec("class", classes=(CAPTIONS.index("a handwritten digit three"),)))
    # the Fishers' one pass over D_r would take minutes here; SalUn's 5 epochs over D_f give way to the 2 steps
    brief = {"sfron": {"fisher_batches": 2}, "salun": {"epochs": None}}.get(method, {})
    result = unlearn(anchored, split, method, steps=2, accelerator=accelerator, **brief)
    before, after = dict(anchored.model.named_parameters()), dict(result.model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)
    if method != "finetune":
        assert 0.2 < result.info["mask_kept_fraction"] < 0.9


def test_salun_and_sfron_masks_from_two_processes_equal_one(tiny_sd, cache_dir, tmp_path, monkeypatch):
    """The SD mask objective's squared gradients (per-batch seeded latents, noise and timesteps) and both masks under
    ``accelerate launch --multi_gpu --num_processes 2`` equal one process's."""
    monkeypatch.setenv("GENUNLEARN_THREADS", "1")  # one thread per process in both launches: the process count is what differs
    save_pipeline(tiny_sd, tmp_path / "sd")
    worker = Path(__file__).parent / "workers" / "sd_masks_dump.py"
    dumps = {}
    for processes in (1, 2):
        out = tmp_path / f"masks{processes}.safetensors"
        done = accelerate_launch(worker, [str(tmp_path / "sd"), str(out)], cache_dir, processes=processes, port=29547)
        assert done.returncode == 0, done.stderr[-2000:]
        dumps[processes] = load_file(str(out))
    one, two = dumps[1], dumps[2]
    assert one.keys() == two.keys()
    for name in one:
        if name.startswith("fisher."):  # float32 batch sums added in another order across processes
            assert torch.allclose(one[name], two[name], rtol=1e-3, atol=1e-6 * float(one[name].abs().max())), name
        else:
            assert torch.equal(one[name], two[name]), name
    for method in ("salun", "sfron"):
        kept = sum(int(one[n].sum()) for n in one if n.startswith(f"{method}."))
        assert 0 < kept < sum(one[n].numel() for n in one if n.startswith(f"{method}."))
