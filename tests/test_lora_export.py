"""An erasure exported as a LoRA (truncated SVD of the weight change per layer): diffusers loads it onto the original
pipeline by itself, it samples what the merged weights sample, and unloading gives the original back."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import genunlearn as gu
from genunlearn.models.lora_export import lora_from_delta, save_lora
from genunlearn.models.prompt_sampling import sd_pipeline_for

PROMPTS = gu.ConceptPrompts(forget=["a photo of a cat"], remain=["a photo of a dog", "a photo of a car"])


def samples(pipeline, seed: int = 0) -> torch.Tensor:
    return pipeline(["a photo of a cat", "a photo of a dog"], num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def erasure(accelerator):
    """ESD-u in esd_sd.py's scope (every Linear and Conv2d weight and bias outside cross-attention) on a toy SD."""
    pipeline = gu.tiny_stable_diffusion(PROMPTS.table)
    task = gu.concept_task(pipeline, PROMPTS, per_prompt=4, steps=2, guidance=3.0, accelerator=accelerator)
    split = gu.forget_split(task, classes=PROMPTS.groups()["forget"])
    erased = gu.unlearn(task, split, "esd", accelerator=accelerator, steps=3, ddim_steps=2, lr=1e-3,
                        scope="linear-non-cross-attention").model
    return task, erased.eval()


def test_a_full_rank_lora_with_its_biases_is_the_erasure(erasure, tmp_path):
    task, erased = erasure
    export = lora_from_delta(task.model, erased, rank=10_000, biases=True)
    assert export.left_out == [] and export.relative_error < 1e-6
    pipeline = sd_pipeline_for(task)
    original = samples(pipeline)
    pipeline.load_lora_weights(str(save_lora(type(pipeline), export, tmp_path / "lora")))
    assert torch.allclose(samples(pipeline), samples(sd_pipeline_for(task, erased)), atol=1e-4)
    pipeline.unload_lora_weights()
    assert torch.equal(samples(pipeline), original)


def test_a_low_rank_lora_loads_with_diffusers_alone_and_samples_as_its_merged_weights(erasure, tmp_path):
    """By default the bias changes stay behind (SD's attention projections have no bias, and lora_bias would make them
    unfusable): they are listed, and the LoRA fuses."""
    task, erased = erasure
    export = lora_from_delta(task.model, erased, rank=1)
    assert 0 < export.relative_error < 1 and set(export.ranks.values()) == {1}
    assert export.left_out and all(name.endswith(".bias") for name in export.left_out)
    full = sum(p.numel() for p in task.model.parameters())
    assert export.parameter_count() < full / 4  # a rank-1 LoRA is a fraction of the UNet
    pipeline = sd_pipeline_for(task)
    pipeline.save_pretrained(tmp_path / "original")
    assert gu.export_lora(task, erased, 1, tmp_path / "lora").layers.keys() == export.layers.keys()
    expected = samples(sd_pipeline_for(task, export.merged_into(task.model)))
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
torch.set_num_threads({torch.get_num_threads()})
from diffusers import DDIMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path / "original")!r})
pipe.set_progress_bar_config(disable=True)
run = lambda: pipe(["a photo of a cat", "a photo of a dog"], num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
before = run()
pipe.load_lora_weights({str(tmp_path / "lora")!r})
assert torch.allclose(run(), torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True), atol=1e-4), "LoRA samples differ"
pipe.unload_lora_weights()
assert torch.equal(run(), before), "unloading did not give the original back"
pipe.load_lora_weights({str(tmp_path / "lora")!r})
pipe.fuse_lora()
assert torch.allclose(run(), torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True), atol=1e-4), "fused samples differ"
assert "genunlearn" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
