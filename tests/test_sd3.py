"""SD3 through the library: a tiny random ``StableDiffusion3Pipeline`` (two CLIP encoders with projections, T5's zero
tokens, an ``SD3Transformer2DModel`` trained by flow matching) is conditioned as diffusers conditions it, every
method's flow-matching objective is the one written out here by hand, and every text-to-image method runs on it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import genunlearn as gu
from helpers import changed_by_two_iterations, text_to_image_methods
from genunlearn.methods import esd
from genunlearn.models.prompt_sampling import sd_pipeline_for
from genunlearn.models.tiny_sd3 import tiny_stable_diffusion_3
from genunlearn.noise import current_noise
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.text_to_image import MASK_GUIDANCE
from genunlearn.tasks.text_to_image_sd3 import FlowMatchTextToImageTask

PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat"], remain=["a photo of a dog", "a photo of a car"])


@pytest.fixture(scope="module")
def sd3_task(accelerator) -> FlowMatchTextToImageTask:
    pipeline = tiny_stable_diffusion_3(PROMPTS.table)
    return gu.concept_task(pipeline, PROMPTS, per_prompt=4, steps=2, guidance=3.0, accelerator=accelerator)


def velocity(task, model, noisy, timesteps, labels):
    """v_θ(x_t, t, c) called the way ``StableDiffusion3Pipeline`` calls its transformer, from its own encoding."""
    pipeline = sd_pipeline_for(task, model)
    embeds, _, pooled, _ = pipeline.encode_prompt([task.prompts[i] if i < task.num_classes else "" for i in labels.tolist()],
                                                  prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False)
    return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled).sample


def flow_draws(task, clean: torch.Tensor, seed: int):
    """``(x_t, v target, t)`` for latents ``clean`` as written in the SD3 paper and diffusers' SD3 scripts, from the
    draws ``task.noised`` makes after ``torch.manual_seed(seed)``: ε, then u = sigmoid(N(0, 1)), index ⌊u T⌋ into the
    training grid, x_t = (1 - σ) x₀ + σ ε, v = ε - x₀."""
    torch.manual_seed(seed)
    noise = current_noise().randn(tuple(clean.shape))
    index = (torch.sigmoid(current_noise().randn((len(clean),))) * 1000).long()
    sigma = task.scheduler.sigmas[index].view(-1, 1, 1, 1)
    return (1 - sigma) * clean + sigma * noise, noise - clean, task.scheduler.timesteps[index]


def test_prompts_are_encoded_and_the_transformer_conditioned_as_the_sd3_pipeline_does(sd3_task):
    labels = torch.tensor([0, 1, 2, sd3_task.null_prompt])  # ∅: the pipeline's negative prompt "", encoded
    noisy, timesteps = torch.randn(4, 4, 4, 4), torch.tensor([10.0, 500.0, 900.0, 999.0])
    with torch.no_grad():
        ours = sd3_task.predict_noise(sd3_task.model, noisy, timesteps, labels)
        theirs = velocity(sd3_task, sd3_task.model, noisy, timesteps, labels)
    assert ours.shape == noisy.shape and torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert sd3_task.prompt_embeddings.shape[1] == 12 + 256  # CLIP's tokens, then T5's 256


def test_every_flow_matching_objective_is_written_out_by_hand(sd3_task):
    model = sd3_task.model.eval()
    clean, labels = sd3_task.train_data.images[:4], sd3_task.train_data.targets[:4]
    noisy, target, timesteps = flow_draws(sd3_task, clean, 3)
    assert torch.allclose(sd3_task.scheduler.timesteps, sd3_task.scheduler.sigmas * 1000)  # t = σ T on the grid
    with torch.no_grad():
        def v(ids):
            return velocity(sd3_task, model, noisy, timesteps, ids)

        torch.manual_seed(3)  # L_DSM: the flow-matching loss, weight 1
        assert torch.allclose(sd3_task.loss(model, (clean, labels)), (v(labels) - target).pow(2).mean(dim=(1, 2, 3)),
                              rtol=1e-4, atol=1e-7)
        null = torch.full_like(labels, sd3_task.null_prompt)
        guided = (1 + MASK_GUIDANCE) * v(labels) - MASK_GUIDANCE * v(null)  # SalUn's objective with v for ε
        torch.manual_seed(3)
        assert torch.allclose(sd3_task.importance_loss(model, (clean, labels)), (guided - target).pow(2).mean(dim=(1, 2, 3)),
                              rtol=1e-4, atol=1e-7)
        other = torch.full_like(labels, 2)  # rl: v(x_t, c_f) pulled onto sg[v(x_t, c')] at the same x_t and t
        torch.manual_seed(3)
        assert torch.allclose(sd3_task.random_label_loss(model, (clean, labels), other),
                              (v(labels) - v(other)).pow(2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-7)


def test_esd_samples_x_t_by_euler_steps_of_the_flow_and_labels_it_on_the_flow_grid(sd3_task):
    model, concept, steps = sd3_task.model.eval(), torch.tensor([0, 0]), 3
    torch.manual_seed(5)
    ours = esd.partially_sampled(model, sd3_task, 10, concept, steps, 3.0)
    torch.manual_seed(5)
    latents = current_noise().randn((2, 4, 4, 4))
    sigmas = sd3_task.sampler(10).sigmas
    with torch.no_grad():
        for k in range(steps):  # x ← x + (σ_{k+1} - σ_k) v̂, v̂ = v(∅) + s (v(c) - v(∅)), t = σ_k T
            t = (sigmas[k] * 1000).expand(2)
            unconditional = velocity(sd3_task, model, latents, t, torch.full_like(concept, sd3_task.null_prompt))
            conditional = velocity(sd3_task, model, latents, t, concept)
            latents = latents + (sigmas[k + 1] - sigmas[k]) * (unconditional + 3.0 * (conditional - unconditional))
    assert torch.allclose(ours, latents, rtol=1e-4, atol=1e-6)
    # a CompVis label (an index of the DDPM-style schedule, 0 clean) is the flow grid's point as far from noise
    grid = sd3_task.scheduler.timesteps
    assert sd3_task.timestep_of_index(999) == grid[0] == 1000 and sd3_task.timestep_of_index(0) == grid[-1] == grid.min()
    assert sd3_task.timestep_of_index(500) == grid[499]


@pytest.mark.parametrize("method", text_to_image_methods())
def test_every_text_to_image_method_runs_two_iterations_on_sd3(method, sd3_task, accelerator):
    changed = changed_by_two_iterations(sd3_task, PROMPTS.groups()["forget"], method, accelerator)
    assert changed
    if method == "esd":  # ESD-u: never the joint attention, where MMDiT's text meets the image
        assert not any(".attn." in k for k in changed)


def test_an_erased_sd3_pipeline_saves_and_loads_with_diffusers_alone_and_exports_a_lora(sd3_task, accelerator, tmp_path):
    split = gu.forget_split(sd3_task, classes=PROMPTS.groups()["forget"])
    erased = gu.unlearn(sd3_task, split, "esd", accelerator=accelerator, steps=2, ddim_steps=2, scope="cross-attention").model
    assert all(".attn." in k for k, p in erased.state_dict().items() if not torch.equal(p, sd3_task.model.state_dict()[k]))
    save_pipeline(sd_pipeline_for(sd3_task, erased), tmp_path / "pipeline")
    gu.export_lora(sd3_task, erased, 16, tmp_path / "lora", biases=True)
    sample = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    expected = sd_pipeline_for(sd3_task, erased)(["a photo of a cat"], generator=torch.Generator().manual_seed(0),
                                                 **sample).images
    torch.save(expected, tmp_path / "expected.pt")
    save_pipeline(sd_pipeline_for(sd3_task), tmp_path / "original")
    script = f"""
import sys, torch
torch.set_num_threads({torch.get_num_threads()})
from diffusers import StableDiffusion3Pipeline
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
pipe = StableDiffusion3Pipeline.from_pretrained({str(tmp_path / "pipeline")!r})
pipe.set_progress_bar_config(disable=True)
images = pipe(["a photo of a cat"], generator=torch.Generator().manual_seed(0), **{sample!r}).images
assert torch.equal(images, expected), "samples differ"
original = StableDiffusion3Pipeline.from_pretrained({str(tmp_path / "original")!r})
original.set_progress_bar_config(disable=True)
before = original(["a photo of a cat"], generator=torch.Generator().manual_seed(0), **{sample!r}).images
original.load_lora_weights({str(tmp_path / "lora")!r})
with_lora = original(["a photo of a cat"], generator=torch.Generator().manual_seed(0), **{sample!r}).images
assert (with_lora - expected).abs().max() < 1e-4, (with_lora - expected).abs().max()
original.unload_lora_weights()
after = original(["a photo of a cat"], generator=torch.Generator().manual_seed(0), **{sample!r}).images
assert torch.equal(before, after) and not torch.equal(before, expected)
assert "genunlearn" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_sd3_pipeline_folder_alone_erases_on_the_command_line_with_lora_training(tmp_path):
    """`genunlearn forget --pretrained SD3_FOLDER --concept ... --method esd --lora-rank 2`: every stage runs on the
    flow-matching transformer, the run's pipeline/ is SD3's, lora/ holds the trained factors (exact at their rank),
    and the report and card say so."""
    import json

    import timm
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from helpers import validate_report
    from test_concept_job import IMAGENETTE, TINY_RUN, erase

    tiny_stable_diffusion_3(IMAGENETTE).save_pretrained(tmp_path / "sd3")
    judge = timm.create_model("test_resnet", num_classes=1000)
    save_file(judge.state_dict(), tmp_path / "judge.safetensors")
    (tmp_path / "retain.txt").write_text("\n".join(IMAGENETTE[1:]) + "\n")
    out = tmp_path / "run"
    assert erase("--pretrained", str(tmp_path / "sd3"), "--concept", IMAGENETTE[0], "--method", "esd",
                 "--set", "ddim_steps=2", "--set", "scope=cross-attention", "--lora-rank", "2", "--lr", "0.01",
                 "--retain-prompts", str(tmp_path / "retain.txt"), "--eval-classifier", "test_resnet",
                 "--eval-classifier-weights", str(tmp_path / "judge.safetensors"), *TINY_RUN, "--output-dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["method_info"]["lora"]["rank"] == 2 and report["method_info"]["lora"]["targets"] == "cross-attention"
    assert report["lora"]["rank"] == 2 and report["lora"]["relative_error"] < 1e-4  # trained at that rank: exact up to float32
    assert "FlowMatchEulerDiscreteScheduler" in report["evaluation"]["sampler"]
    card = (out / "README.md").read_text()
    assert 'StableDiffusion3Pipeline.from_pretrained("RUN/pipeline")' in card and 'subfolder="transformer"' in card
    assert "SD3, flow matching" in card and "trained as rank-2 LoRA factors, merged" in card  # family, full or LoRA
    assert 'pipe.load_lora_weights("RUN/lora")' in card
    original = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", local_files_only=True)
    original.load_lora_weights(str(out / "lora"))
    loaded = StableDiffusion3Pipeline.from_pretrained(out / "pipeline", local_files_only=True)
    images = loaded(IMAGENETTE[0], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)
