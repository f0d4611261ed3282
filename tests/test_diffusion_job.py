"""The main job on a diffusion model: a tiny pipeline saved to a folder and passed as --pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from genunlearn.cli import forget_main, guarded
from genunlearn.data.digits import load_digits_split
from genunlearn.models.diffusion_loading import load_diffusion_task, load_pipeline, pipeline_for, save_pipeline
from test_diffusion import tiny_digits_preset


@pytest.fixture(scope="module")
def tiny_pipeline_dir(accelerator, tmp_path_factory):
    """A tiny DDPM trained for one epoch on the digits, saved as a pipeline folder."""
    root = tmp_path_factory.mktemp("tiny-ddpm")
    train, test = load_digits_split()
    task = load_diffusion_task(tiny_digits_preset(), train, test, "digits8", pretrained=None, cache_root=root, accelerator=accelerator)
    save_pipeline(pipeline_for(task), root / "pipeline")
    return root / "pipeline"


def test_diffusion_job_writes_report_grids_and_pipeline(cnn_task, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "4",
            "--eval-samples", "20", "--eval-steps", "5", "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    assert "fid_remain" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (report["kind"], report["model"], report["class"], report["method"], report["steps"]) == ("diffusion", "ddpm-digits", 3, "sfron", 4)
    for phase in ("before", "after"):
        metrics = report[phase]
        assert 0.0 <= metrics["forget_acc"] <= 1.0 and 0.0 <= metrics["remain_acc"] <= 1.0 and metrics["fid_remain"] >= 0.0
        assert sorted(metrics["per_class_acc"]) == [str(c) for c in range(10)]
        assert metrics["forget_acc"] == metrics["per_class_acc"]["3"]
    assert report["evaluation"]["per_class"] == 20 and report["evaluation"]["steps"] == 5
    for name in ("samples_before.png", "samples_after.png"):
        with Image.open(out / name) as grid:
            assert grid.size[1] == 10 * (8 * 4 + 2) + 2  # one row per class
    assert "![before](samples_before.png)" in (out / "report.md").read_text()
    unlearned, original = load_pipeline(out / "pipeline"), load_pipeline(tiny_pipeline_dir)
    changed = [not torch.equal(a, b) for a, b in zip(unlearned.denoiser.state_dict().values(), original.denoiser.state_dict().values())]
    assert any(changed)  # the saved pipeline holds the unlearned weights; the original folder is untouched
    assert json.loads((out / "run.json").read_text())["pretrained"] == str(tiny_pipeline_dir)


def test_diffusion_job_rejects_bad_input(tiny_pipeline_dir, tmp_path, capsys):
    base = ["--model", "ddpm-digits", "--output-dir", str(tmp_path / "out")]
    assert guarded(forget_main, [*base, "--pretrained", str(tiny_pipeline_dir), "--class", "10"]) == 2
    assert "class 10 is out of range" in capsys.readouterr().err
    assert guarded(forget_main, [*base, "--pretrained", str(tmp_path), "--class", "3"]) == 2
    assert "not a diffusion pipeline folder" in capsys.readouterr().err
    assert guarded(forget_main, [*base, "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--eval-samples", "1"]) == 2
    assert "--eval-samples and --data-free-samples must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_data_free_job_forgets_from_generated_samples(cnn_task, tiny_pipeline_dir, cache_dir, tmp_path):
    out = tmp_path / "free"
    argv = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "2", "--data-free",
            "--data-free-samples", "6", "--eval-samples", "10", "--eval-steps", "3", "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["forget"] == 6 and report["split"]["retain"] == 54  # the model's own samples
    assert report["split"]["test_forget"] == 2 and report["evaluation"]["fid_reference"] == "original model's samples"
    generated = list((cache_dir / "generated").glob("*.safetensors"))
    assert len(generated) == 1  # generated once, cached
    assert guarded(forget_main, [*argv[:-1], str(tmp_path / "again")]) == 0
    assert list((cache_dir / "generated").glob("*.safetensors")) == generated
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["before"] == report["before"]


def test_data_free_is_for_diffusion_models(cnn_task, tmp_path, capsys):
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--data-free", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--data-free applies to diffusion models" in capsys.readouterr().err


def test_generated_training_data_never_reuses_evaluation_seeds(tiny_pipeline_dir, accelerator):
    from genunlearn.data.generated import generated_datasets
    from genunlearn.eval.generative import sample_classes

    pipe = load_pipeline(tiny_pipeline_dir)
    train, test = generated_datasets(pipe, [str(c) for c in range(10)], 4, accelerator, guidance=1.0, steps=3, seed=0, cache_dir=None)
    evaluation = sample_classes(pipe, [3], 4, accelerator, guidance=1.0, steps=3, seed=0)[3]
    forget_images = train.images[train.targets == 3]
    assert forget_images.shape == evaluation.shape and not torch.equal(forget_images, evaluation)
    assert not torch.equal(test.images[test.targets == 3], forget_images[:2])
