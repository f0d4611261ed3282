"""The dit-xl path: a tiny DiTPipeline stand-in (1000 classes, small DiT, tiny VAE) through the main job, the hub id
without network, and (slow) one SFR-on iteration of the real DiT-XL/2 architecture with random weights."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from genunlearn.cli import forget_main, guarded
from genunlearn.data.split import SplitSpec, make_forget_split
from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.methods.registry import method_config
from genunlearn.models.sampling import sample_images
from genunlearn.models.presets import get_preset
from genunlearn.tasks.diffusion import DiffusionTask, build_denoiser, build_noise_scheduler

TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 1,
            "sample_size": 4, "patch_size": 2}


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> dict[str, Path]:
    """A tiny 1000-class latent DiTPipeline folder (8x8 RGB images, 4x4x4 latents), a tiny ImageNet-shaped timm
    classifier's weights, and the dit-xl preset with its architecture swapped for the tiny one."""
    root = tmp_path_factory.mktemp("dit-xl-standin")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(**TINY_DIT, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=8)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label={207: "golden retriever"})
    pipeline.register_to_config(id2label={207: "golden retriever"})
    pipeline.save_pretrained(root / "pipeline")
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(root / "judge.safetensors"))
    preset = yaml.safe_load((Path(__file__).parents[1] / "genunlearn/configs/models/dit-xl.yaml").read_text())
    preset["model_args"] = TINY_DIT
    (root / "tiny-dit-xl.yaml").write_text(yaml.safe_dump(preset))
    return {"root": root, "pipeline": root / "pipeline", "judge": root / "judge.safetensors", "preset": root / "tiny-dit-xl.yaml"}


def test_dit_xl_job_on_a_tiny_ditpipeline(standin, cache_dir, tmp_path):
    out = tmp_path / "run"
    original = {k: v.clone() for k, v in DiTPipeline.from_pretrained(standin["pipeline"]).transformer.state_dict().items()}
    argv = ["--model", str(standin["preset"]), "--pretrained", str(standin["pipeline"]), "--class", "207",
            "--steps", "2", "--batch-size", "2", "--data-free-samples", "4", "--remain-classes", "2", "--eval-samples", "3",
            "--eval-steps", "2", "--eval-classifier", "test_resnet", "--eval-classifier-weights", str(standin["judge"]),
            "--output-dir", str(out)]
    earlier = set((cache_dir / "generated").glob("*.safetensors"))  # other tests' generations share the session cache
    assert guarded(forget_main, argv) == 0
    report = json.loads((out / "report.json").read_text())
    evaluation = report["evaluation"]
    assert evaluation["data_free"] and evaluation["fid_reference"] == "original model's samples"
    assert evaluation["classes"][0] == 207 and len(evaluation["classes"]) == 3 and evaluation["guidance"] == 4.0
    assert report["split"]["forget"] == 4 and report["split"]["retain"] == 8  # the model's own latents, 2 other classes
    heldout = evaluation["heldout_classes"]  # as many classes outside D_r, scored apart
    assert len(heldout) == 2 and not set(heldout) & set(evaluation["classes"])
    assert sorted(report["after"]["per_class_acc"]) == sorted(str(c) for c in evaluation["classes"] + heldout)
    assert sorted(report["after"]["fid_per_class"]) == sorted(str(c) for c in evaluation["classes"][1:] + heldout)
    for metrics in (report["before"], report["after"]):
        assert metrics["heldout_acc"] == sum(metrics["per_class_acc"][str(c)] for c in heldout) / 2
        assert metrics["fid_heldout"] is not None and metrics["fid_heldout"] >= 0
    generated = [load_file(str(p)) for p in set((cache_dir / "generated").glob("*.safetensors")) - earlier]
    shapes = sorted(g["train_images"].shape for g in generated if g["train_images"].shape[1] == 4)  # latents
    assert shapes == [(8, 4, 4, 4), (12, 4, 4, 4)]  # the held-out reference, and D_f + D_r

    reloaded = DiTPipeline.from_pretrained(out / "pipeline")  # diffusers' own class reads the result
    assert reloaded.labels == {"golden retriever": 207}
    assert any(not torch.equal(v, original[k]) for k, v in reloaded.transformer.state_dict().items())
    assert all(torch.equal(v, original[k]) for k, v in DiTPipeline.from_pretrained(standin["pipeline"]).transformer.state_dict().items())
    again = DiTPipeline.from_pretrained(out / "pipeline")
    first, second = (sample_images(p, [207, 3], guidance=4.0, steps=3, generator=torch.Generator().manual_seed(5))
                     for p in (reloaded, again))
    assert first.shape == (2, 3, 8, 8) and torch.equal(first, second)


def test_dit_xl_hub_id_without_network_says_how_to_get_the_weights(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "GENUNLEARN_CACHE": str(tmp_path / "cache")}
    script = Path(__file__).parents[1] / "scripts" / "forget_class.py"
    run = subprocess.run([sys.executable, str(script), "--model", "dit-xl", "--class", "207", "--output-dir", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "facebook/DiT-XL-2-256" in run.stderr and "--pretrained DIR" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "o" / "report.json").exists()


@pytest.mark.slow
def test_one_sfron_iteration_of_dit_xl_2(accelerator, tmp_path):
    """The real DiT-XL/2 architecture (random weights, 750M parameters in diffusers' layout) on CPU: Fishers, mask and one fast-slow
    iteration on latents; prints time and peak memory."""
    preset = get_preset("dit-xl")
    torch.manual_seed(0)
    model = build_denoiser(preset, 1000)
    latents = torch.randn(4, 4, 32, 32)
    data = LabeledTensorDataset(latents, torch.tensor([207, 207, 1, 2]), [str(c) for c in range(1000)])
    task = DiffusionTask(preset, model.eval(), build_noise_scheduler(preset), data, data, cache_dir=tmp_path, encoded_data=True)
    split = make_forget_split(data, data, SplitSpec("class", classes=(207,)))
    spec, cfg = method_config("sfron", preset, {"steps": 1, "batch_size": 1})
    before = {k: v.clone() for k, v in model.state_dict().items() if "transformer_blocks.0." in k}
    started = time.perf_counter()
    result = spec.run(task, split, cfg, accelerator, checkpoint_dir=None, resume=False)
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nDiT-XL/2 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters): one SFR-on iteration incl. "
          f"Fishers and mask {seconds:.1f} s, peak RSS {peak_gib:.1f} GiB, mask keeps {result.info['mask_kept_fraction']:.3f}")
    after = result.model.state_dict()
    assert result.steps == 1 and any(not torch.equal(v, after[k]) for k, v in before.items())

