"""SD-XL through the library: a tiny random ``StableDiffusionXLPipeline`` (two text encoders, pooled prompt embeddings,
micro-conditioning time ids) is conditioned as diffusers conditions it and runs every text-to-image method."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import genunlearn as gu
from helpers import changed_by_two_iterations, text_to_image_methods
from genunlearn.models.prompt_sampling import sd_pipeline_for
from genunlearn.models.tiny_sd import tiny_stable_diffusion_xl
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.text_to_image_xl import TextToImageXLTask, encode_prompts_xl

PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat"], remain=["a photo of a dog", "a photo of a car"])


@pytest.fixture(scope="module")
def xl_task(accelerator) -> TextToImageXLTask:
    pipeline = tiny_stable_diffusion_xl(PROMPTS.table)
    return gu.concept_task(pipeline, PROMPTS, per_prompt=4, steps=2, guidance=3.0, accelerator=accelerator)


def test_prompts_are_encoded_and_the_unet_conditioned_as_the_sdxl_pipeline_does(xl_task):
    pipeline = sd_pipeline_for(xl_task)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    table = list(PROMPTS.table)
    embeds, _, pooled, _ = pipeline.encode_prompt(table, device="cpu", do_classifier_free_guidance=False)
    hidden, own_pooled = encode_prompts_xl((pipeline.text_encoder, pipeline.text_encoder_2),
                                           (pipeline.tokenizer, pipeline.tokenizer_2), table)
    assert torch.equal(hidden, embeds) and torch.equal(own_pooled, pooled)
    size = pipeline.default_sample_size * pipeline.vae_scale_factor
    time_ids = pipeline._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32,
                                          text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim)
    noisy, timesteps, labels = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        ours = xl_task.predict_noise(xl_task.model, noisy, timesteps, labels)
        theirs = pipeline.unet(noisy, timesteps, encoder_hidden_states=embeds[labels],
                               added_cond_kwargs={"text_embeds": pooled[labels], "time_ids": time_ids.repeat(3, 1)}).sample
        # ∅ is the pipeline's unconditional half: zeros for both embeddings (force_zeros_for_empty_prompt)
        null = xl_task.predict_noise(xl_task.model, noisy, timesteps, torch.full_like(labels, xl_task.null_prompt))
        zero = pipeline.unet(noisy, timesteps, encoder_hidden_states=torch.zeros_like(embeds[labels]),
                             added_cond_kwargs={"text_embeds": torch.zeros_like(pooled[labels]), "time_ids": time_ids.repeat(3, 1)}).sample
    # the task encodes its whole table (∅ row included) in one batch: the same numbers up to float32 sums' order
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6) and torch.allclose(null, zero, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", text_to_image_methods(unet_only=()))
def test_every_text_to_image_method_runs_two_iterations_on_sdxl(method, xl_task, accelerator):
    changed = changed_by_two_iterations(xl_task, PROMPTS.groups()["forget"], method, accelerator)
    assert changed
    if method == "esd":  # ESD-u by default on the references' settings: never the cross-attention
        assert not any("attn2" in k for k in changed)


def test_an_erased_sdxl_pipeline_saves_and_loads_with_diffusers_alone(xl_task, accelerator, tmp_path):
    split = gu.forget_split(xl_task, classes=PROMPTS.groups()["forget"])
    erased = gu.unlearn(xl_task, split, "esd", accelerator=accelerator, steps=2, ddim_steps=2, scope="cross-attention").model
    save_pipeline(sd_pipeline_for(xl_task, erased), tmp_path / "pipeline")
    expected = sd_pipeline_for(xl_task, erased)(["a photo of a cat"], num_inference_steps=2, guidance_scale=3.0,
                                                generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
torch.set_num_threads({torch.get_num_threads()})
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained({str(tmp_path / "pipeline")!r})
pipe.set_progress_bar_config(disable=True)
images = pipe(["a photo of a cat"], num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
              output_type="pt").images
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)  # float tolerance: after a CLI run set this process to GENUNLEARN_THREADS, the two processes round differently
assert torch.allclose(images, expected, atol=1e-5), ("samples differ", (images - expected).abs().max())
assert "genunlearn" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_sdxl_pipeline_folder_alone_erases_on_the_command_line_and_exports_a_lora(tmp_path):
    """`genunlearn forget --pretrained SDXL_FOLDER --concept ... --export-lora-rank 2`: the folder is the model (the
    sd-1.5 preset's method and judge settings, its own size and schedule), every stage runs, the run's pipeline/ is
    SD-XL's, and lora/ holds the erasure as a rank-2 LoRA, measured in the report and loadable onto the original."""
    import json

    import timm
    from safetensors.torch import save_file

    from helpers import validate_report
    from test_concept_job import IMAGENETTE, TINY_RUN, erase

    tiny_stable_diffusion_xl(IMAGENETTE).save_pretrained(tmp_path / "sdxl")
    judge = timm.create_model("test_resnet", num_classes=1000)
    save_file(judge.state_dict(), tmp_path / "judge.safetensors")
    (tmp_path / "retain.txt").write_text("\n".join(IMAGENETTE[1:]) + "\n")
    out = tmp_path / "run"
    assert erase("--pretrained", str(tmp_path / "sdxl"), "--concept", IMAGENETTE[0], "--method", "sfron",
                 "--retain-prompts", str(tmp_path / "retain.txt"), "--eval-classifier", "test_resnet",
                 "--eval-classifier-weights", str(tmp_path / "judge.safetensors"), *TINY_RUN, "--export-lora-rank", "2",
                 "--output-dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["model"] == "sdxl" and report["prompts"]["remain"] == IMAGENETTE[1:]
    lora = report["lora"]
    assert lora["rank"] == 2 and 0 < lora["relative_error"] < 1 and lora["layers"] > 0
    assert lora["after"].keys() == report["after"].keys()  # measured as the full erasure is
    original = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", local_files_only=True)
    original.load_lora_weights(str(out / "lora"))  # the original pipeline takes the exported erasure
    card = (out / "README.md").read_text()
    assert 'StableDiffusionXLPipeline.from_pretrained("RUN/pipeline")' in card and 'pipe.load_lora_weights("RUN/lora")' in card
    loaded = StableDiffusionXLPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert loaded.text_encoder_2 is not None and loaded.config.force_zeros_for_empty_prompt
    images = loaded(IMAGENETTE[0], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("argv, message", [
    (["--model", "cnn-digits", "--class", "3", "--export-lora-rank", "4"], "--export-lora-rank and --attack are for text-to-image models"),
    (["--model", "sd-digits", "--concept", "a handwritten digit three", "--export-lora-rank", "0"],
     "--export-lora-rank must be at least 1"),
])
def test_a_lora_export_where_none_applies_is_one_error_line(argv, message, cnn_task, tmp_path, capsys):
    from genunlearn.cli import forget_main, guarded

    assert guarded(forget_main, [*argv, "--output-dir", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and not (tmp_path / "run").exists()


def test_sdxl_generations_and_esd_samples_never_clip_their_latents(xl_task):
    """SD-XL's Euler config names no ``clip_sample`` and DDIM's default clips x̂₀ to [-1, 1], which wrecks latents
    (sdxl-digits' samples were noise, 0.20 recognised, until DDIM was told)."""
    from genunlearn.models.prompt_sampling import sampler_like

    pipeline = tiny_stable_diffusion_xl(PROMPTS.table)
    assert "clip_sample" not in pipeline.scheduler.config or pipeline.scheduler.config.clip_sample is False
    assert sampler_like(pipeline).scheduler.config.clip_sample is False
    assert sd_pipeline_for(xl_task).scheduler.config.clip_sample is False and xl_task.sampler(5).config.clip_sample is False
