"""Text-to-image foundations: the offline tiny Stable Diffusion pipeline and the captioned digits."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from genunlearn.data.captioned_digits import CAPTIONS, DIGIT_WORDS, PHRASINGS, STYLES, VOCABULARY, captioned_digits_split, styled
from genunlearn.data.digits import load_digits_split
from genunlearn.errors import UserError
from genunlearn.models.tiny_sd import build_tiny_sd
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.text_to_image import TextToImageTask

TINY_SD = {  # ALGORITHMS_T2I.md §5
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64], "layers_per_block": 1,
             "norm_num_groups": 8, "attention_head_dim": 8},
    "vae": {"in_channels": 1, "out_channels": 1, "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [16], "layers_per_block": 1, "norm_num_groups": 8},
}


@pytest.fixture(scope="module")
def tiny_sd() -> StableDiffusionPipeline:
    return build_tiny_sd(VOCABULARY, **TINY_SD)


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


@pytest.fixture(scope="module")
def sd_task(tiny_sd) -> TextToImageTask:
    train, test = captioned_digits_split(seed=0)
    return TextToImageTask("tiny-sd", tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer,
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
    rest = dict(sd_task.trainable_parameters(unet, "non-cross-attention"))
    assert sum(p.numel() for p in cross.values()) == 49_408 and all("attn2" in name for name in cross)
    assert not set(cross) & set(rest)
    assert "conv_out.weight" in rest and "time_embedding.linear_1.weight" in rest  # ESD-u (diffusers) trains these
    assert not any("norm" in name for name in rest)
    assert len(dict(unet.named_parameters())) == len(sd_task.trainable_parameters(unet, "all"))
    with pytest.raises(UserError, match="unknown parameter scope"):
        sd_task.trainable_parameters(unet, "attn1")
