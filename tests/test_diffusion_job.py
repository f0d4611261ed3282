"""The main job on a diffusion model: a tiny pipeline saved to a folder and passed as --pretrained."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from genunlearn.cli import evaluate_main, forget_main, guarded
from genunlearn.data.digits import load_digits_split
from genunlearn.models.diffusion_loading import load_diffusion_task
from genunlearn.models.sampling import pipeline_for
from genunlearn.storage.pipeline_folder import load_pipeline, save_pipeline
from helpers import accelerate_launch, exact_text, forgotten_mark_pixels, unreadable_files, validate_report
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
    argv = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "4", "--log-every", "2",
            "--eval-samples", "20", "--eval-steps", "5", "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    assert "fid_remain" in capsys.readouterr().out
    assert unreadable_files(out) == []  # the pipeline's safetensors and the grids as readable as report.json
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    with pytest.raises(jsonschema.ValidationError):  # a diffusion report without its protocol
        validate_report({k: v for k, v in report.items() if k != "evaluation"})
    assert (report["kind"], report["model"], report["class"], report["method"], report["steps"]) == ("diffusion", "ddpm-digits", 3, "sfron", 4)
    for phase in ("before", "after"):
        metrics = report[phase]
        assert 0.0 <= metrics["forget_acc"] <= 1.0 and 0.0 <= metrics["remain_acc"] <= 1.0 and metrics["fid_remain"] >= 0.0
        assert sorted(metrics["per_class_acc"]) == [str(c) for c in range(10)]
        assert metrics["forget_acc"] == metrics["per_class_acc"]["3"]
    assert report["evaluation"]["per_class"] == 20 and report["evaluation"]["steps"] == 5
    with Image.open(out / "samples.png") as grid:
        run_picture = grid.size  # before and after side by side: twice an evaluation's width (below)
    assert forgotten_mark_pixels(out / "samples.png") > 0  # the forgotten row is marked (digits are grey: no red otherwise)
    markdown = (out / "report.md").read_text()
    assert "![samples](samples.png)" in markdown and "![curves](curves.png)" in markdown
    assert "| class | acc before | acc after |" in markdown and "- fid_library: torchmetrics" in markdown
    assert "| **3 (forgotten)** |" in markdown and "| 4 |" in markdown
    with Image.open(out / "curves.png") as curves:
        assert curves.size[0] > 300
    assert sorted(report["after"]["fid_per_class"]) == [str(c) for c in range(10) if c != 3]
    protocol = report["evaluation"]
    assert protocol["sampler"] == "DDIM" and protocol["weights"] == "raw (no EMA)" and protocol["fid_features"] == "cnn-digits pre-logits"
    assert protocol["reference_per_class"]["0"] == sum(1 for _, label in load_digits_split()[0] if label == 0)
    unlearned, original = load_pipeline(out / "pipeline"), load_pipeline(tiny_pipeline_dir)
    changed = [not torch.equal(a, b) for a, b in zip(unlearned.denoiser.state_dict().values(), original.denoiser.state_dict().values())]
    assert any(changed)  # the saved pipeline holds the unlearned weights; the original folder is untouched
    assert json.loads((out / "run.json").read_text())["pretrained"] == str(tiny_pipeline_dir)

    protocol_args = ["--model", "ddpm-digits", "--class", "3", "--eval-samples", "20", "--eval-steps", "5"]
    for phase, pipeline in (("before", tiny_pipeline_dir), ("after", out / "pipeline")):  # evaluate reproduces the run's figures
        assert guarded(evaluate_main, [*protocol_args, "--pretrained", str(pipeline), "--output-dir", str(tmp_path / phase)]) == 0
        evaluation = json.loads((tmp_path / phase / "evaluation.json").read_text())
        assert evaluation["metrics"] == report[phase] and evaluation["evaluation"] == report["evaluation"]
        with Image.open(tmp_path / phase / "samples.png") as grid:
            assert grid.size[1] == run_picture[1] and 1.8 < run_picture[0] / grid.size[0] < 2.2  # one panel, same rows
        assert forgotten_mark_pixels(tmp_path / phase / "samples.png") > 0
        assert "| **3 (forgotten)** | " in (tmp_path / phase / "evaluation.md").read_text()
    no_class = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--eval-samples", "4", "--eval-steps", "2"]
    assert guarded(evaluate_main, [*no_class, "--output-dir", str(tmp_path / "all")]) == 0  # no forgotten class named
    metrics = json.loads((tmp_path / "all" / "evaluation.json").read_text())["metrics"]
    assert metrics["forget_acc"] is None and sorted(metrics["per_class_acc"]) == [str(c) for c in range(10)]
    assert forgotten_mark_pixels(tmp_path / "all" / "samples.png") == 0  # nothing forgotten, nothing marked


def test_a_diffusion_run_with_its_output_in_files_has_no_progress_bars(cnn_task, tiny_pipeline_dir, cache_dir, tmp_path):
    """Loading the --pretrained pipeline draws diffusers' own bar on a terminal; in a file it must not."""
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        done = subprocess.run([str(Path(sys.executable).with_name("genunlearn")), "forget", "--model", "ddpm-digits",
                               "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "2", "--eval-samples", "2",
                               "--eval-steps", "2", "--output-dir", str(tmp_path / "run")], stdout=stdout, stderr=stderr,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("TQDM_")},
                                   "GENUNLEARN_CACHE": str(cache_dir)})
    printed = exact_text(tmp_path / "stdout.txt", tmp_path / "stderr.txt")
    assert done.returncode == 0, printed[-2000:]
    assert "\r" not in printed and "\x1b" not in printed and "unlearning: step 2/2" in printed


def test_diffusion_job_rejects_bad_input(tiny_pipeline_dir, tmp_path, capsys):
    base = ["--model", "ddpm-digits", "--output-dir", str(tmp_path / "out")]
    assert guarded(forget_main, [*base, "--pretrained", str(tiny_pipeline_dir), "--class", "10"]) == 2
    assert "class 10 is out of range" in capsys.readouterr().err
    assert guarded(forget_main, [*base, "--pretrained", str(tmp_path), "--class", "3"]) == 2
    assert "not a diffusion pipeline folder" in capsys.readouterr().err
    assert guarded(forget_main, [*base, "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--eval-samples", "1"]) == 2
    assert "--eval-samples and --data-free-samples must be at least 2" in capsys.readouterr().err
    assert guarded(forget_main, [*base, "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--data-free-guidance", "1"]) == 2
    assert "--data-free-guidance applies to text-to-image models" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_data_free_job_forgets_from_generated_samples(cnn_task, tiny_pipeline_dir, cache_dir, tmp_path):
    out = tmp_path / "free"
    argv = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "2", "--data-free",
            "--data-free-samples", "6", "--eval-samples", "10", "--eval-steps", "3", "--output-dir", str(out)]
    earlier = set((cache_dir / "generated").glob("*.safetensors"))  # other tests of the session share the cache
    assert guarded(forget_main, argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["forget"] == 6 and report["split"]["retain"] == 54  # the model's own samples
    assert report["split"]["test_forget"] == 2 and report["evaluation"]["fid_reference"] == "original model's samples"
    generated = set((cache_dir / "generated").glob("*.safetensors")) - earlier
    assert len(generated) == 1  # generated once, cached
    assert guarded(forget_main, [*argv[:-1], str(tmp_path / "again")]) == 0
    assert set((cache_dir / "generated").glob("*.safetensors")) - earlier == generated
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["before"] == report["before"]


def test_data_free_is_for_diffusion_models(cnn_task, tmp_path, capsys):
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--data-free", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--data-free applies to diffusion models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--data-free-guidance", "1",
                                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "--data-free-guidance applies to text-to-image models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generated_training_data_never_reuses_evaluation_seeds(tiny_pipeline_dir, accelerator):
    from genunlearn.data.generated import generated_datasets
    from genunlearn.models.sampling import sample_classes

    pipe = load_pipeline(tiny_pipeline_dir)
    train, test = generated_datasets(pipe, [str(c) for c in range(10)], [3, 5], 4, accelerator, guidance=1.0, steps=3, seed=0,
                                     cache_dir=None)
    assert sorted(set(train.targets.tolist())) == [3, 5] and len(train.classes) == 10
    evaluation = sample_classes(pipe, [3], 4, accelerator, guidance=1.0, steps=3, seed=0)[3]
    forget_images = train.images[train.targets == 3]
    assert forget_images.shape == evaluation.shape and not torch.equal(forget_images, evaluation)
    assert not torch.equal(test.images[test.targets == 3], forget_images[:2])


def test_sfron_fishers_and_mask_from_two_processes_equal_one(tiny_pipeline_dir, cache_dir, tmp_path):
    """The diffusion Fishers (the reference's guided ε loss at antithetic t, per-batch seeded noise), SFR-on's mask and
    its weights after 3 iterations under ``accelerate launch --multi_gpu --num_processes 2`` equal one process's."""
    worker = Path(__file__).parent / "workers" / "sfron_mask_dump.py"
    dumps = {}
    for processes in (1, 2):
        out = tmp_path / f"mask{processes}.safetensors"
        done = accelerate_launch(worker, [str(tiny_pipeline_dir), str(out)], cache_dir, processes=processes, port=29523)
        assert done.returncode == 0, done.stderr[-2000:]
        dumps[processes] = load_file(str(out))
    one, two = dumps[1], dumps[2]
    assert one.keys() == two.keys()
    for name in one:
        if name.startswith("mask."):
            assert torch.equal(one[name], two[name]), name
        elif name.startswith("weights."):
            # the loop's noise is drawn for the global batch and sliced per process: the same steps up to the order
            # float32 sums are taken in (Adam's first steps move every weight by about lr = 2e-4)
            assert torch.allclose(one[name], two[name], rtol=0, atol=2e-6), name
        else:
            # float32 batch gradients summed in another order by other thread counts (seen: 1.05e-4 relative)
            assert torch.allclose(one[name], two[name], rtol=1e-3, atol=1e-12), name
    kept = sum(int(one[n].sum()) for n in one if n.startswith("mask."))
    assert 0 < kept < sum(one[n].numel() for n in one if n.startswith("mask."))  # the mask selects, it is not all or nothing


def test_gradient_checkpointing_changes_memory_not_results(cnn_task, tiny_pipeline_dir, tmp_path):
    base = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "2",
            "--eval-samples", "4", "--eval-steps", "2"]
    reports = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        assert guarded(forget_main, [*base, *extra, "--output-dir", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    assert reports[0]["after"] == reports[1]["after"] and reports[0]["log"] == reports[1]["log"]


def test_ddpm_cifar10_path_on_a_tiny_image_folder(tmp_path):
    """ddpm-cifar10 with its UNet shrunk (a preset YAML file): pretrained here on an RGB 32x32 image folder (--data),
    judged by resnet18-cifar10 trained on the same folder, FID against the folder's real retain images."""
    import numpy as np
    import yaml

    root = tmp_path / "cifar"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for index, name in enumerate(("airplane", "cat", "ship")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 70 * index, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    configs = Path(__file__).parents[1] / "genunlearn" / "configs" / "models"
    judge = yaml.safe_load((configs / "resnet18-cifar10.yaml").read_text())
    judge["train"]["epochs"] = 1
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(judge))
    preset = yaml.safe_load((configs / "ddpm-cifar10.yaml").read_text())
    preset["model_args"].update(block_out_channels=[8, 16], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                up_block_types=["AttnUpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=4)
    preset["train"]["epochs"] = 1
    preset["eval_classifier"] = str(tmp_path / "judge.yaml")
    (tmp_path / "tiny-ddpm-cifar10.yaml").write_text(yaml.safe_dump(preset))
    out = tmp_path / "run"
    argv = ["--model", str(tmp_path / "tiny-ddpm-cifar10.yaml"), "--data", str(root), "--class", "1", "--steps", "2",
            "--batch-size", "4", "--eval-samples", "3", "--eval-steps", "2", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["forget"] == 6 and report["split"]["retain"] == 12
    assert report["evaluation"]["fid_reference"] == "real retain images" and report["evaluation"]["guidance"] == 3.0
    images = load_pipeline(out / "pipeline")([0, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(32, 32)] * 2 and images[0].mode == "RGB"  # PIL, diffusers' default
    assert guarded(forget_main, ["--model", "ddpm-cifar10", "--class", "1", "--output-dir", str(tmp_path / "none")]) == 2


def test_fid_library_choice_changes_only_the_distance_routine(cnn_task, tiny_pipeline_dir, tmp_path):
    """The same samples and features through clean-fid and torchmetrics: FIDs within 1e-3 relative."""
    base = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "1",
            "--eval-samples", "20", "--eval-steps", "2"]
    reports = {}
    for library in ("torchmetrics", "clean-fid"):
        assert guarded(forget_main, [*base, "--fid-library", library, "--output-dir", str(tmp_path / library)]) == 0
        reports[library] = json.loads((tmp_path / library / "report.json").read_text())
    ours, theirs = reports["torchmetrics"]["before"], reports["clean-fid"]["before"]
    assert ours["forget_acc"] == theirs["forget_acc"]
    assert theirs["fid_remain"] == pytest.approx(ours["fid_remain"], rel=1e-3)
    assert reports["clean-fid"]["evaluation"]["fid_library"].startswith("clean-fid ")


def load_benchmark(name: str):
    """A script of benchmarks/ as a module."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_forget_quality_benchmark_reuses_finished_cells(cnn_task, tiny_pipeline_dir, tmp_path, capsys):
    benchmark = load_benchmark("forget_quality")
    out = tmp_path / "fq"
    argv = ["--presets", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--classes", "3", "--seeds", "0", "1",
            "--data", "real", "--methods", "sfron", "--set", "steps=4", "--every", "2", "--fid-every", "0", "--forget-samples", "8",
            "--screen-samples", "4", "--remain-samples", "4", "--eval-steps", "3", "--no-oracle", "--output", str(out),
            "--cells", str(out / "cells")]
    benchmark.main(argv)
    assert capsys.readouterr().out.count("running ") == 2
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.name for c in cells] == ["ddpm-digits__real__original__c3__s0.json", "ddpm-digits__real__original__c3__s1.json",
                                       "ddpm-digits__real__sfron__c3__s0__p1.json", "ddpm-digits__real__sfron__c3__s1__p1.json"]
    run = json.loads(cells[2].read_text())
    assert [p["step"] for p in run["curve"]] == [2, 4] and run["remain"][-1]["step"] == 4
    assert run["device"] == "cpu" and run["environment"]["mixed_precision"] == "no"
    assert run["final"]["forget_n"] in (4, 8) and run["final"]["fid_ratio"] == run["final"]["fid_remain"] / run["original"]["fid_remain"]
    summary = json.loads((out / "forget_quality.json").read_text())["summary"]
    assert len(summary) == 1 and summary[0]["runs"] == 2
    assert summary[0]["forget_acc"]["values"] == [json.loads(c.read_text())["final"]["forget_acc"] for c in cells[2:]]
    assert (out / "forget_quality.md").is_file() and (out / "forget_quality-ddpm-digits.png").stat().st_size > 1000

    stamps = {c.name: c.stat().st_mtime_ns for c in cells}
    cells[3].unlink()  # a killed grid: one run is missing
    benchmark.main(argv)
    assert capsys.readouterr().out.count("running ") == 1  # only the missing run is done again
    assert all(c.stat().st_mtime_ns == stamps[c.name] for c in cells[:3])
    running = out / "work" / "a-run-of-another-grid" / "checkpoint-10"
    running.mkdir(parents=True)
    benchmark.main(["--report-only", "--output", str(out), "--cells", str(out / "cells")])  # the summary of whatever finished, running nothing
    assert capsys.readouterr().out.count("running ") == 0 and running.is_dir()  # nobody else's checkpoints touched
    assert json.loads((out / "forget_quality.json").read_text())["summary"][0]["runs"] == 2
    moved = json.loads(cells[3].read_text())
    cells[3].write_text(json.dumps({**moved, "device": "NVIDIA H200"}))  # a run measured on another machine
    benchmark.main(["--report-only", "--output", str(out), "--cells", str(out / "cells")])
    rows = json.loads((out / "forget_quality.json").read_text())["summary"]
    assert sorted((r["device"], r["runs"]) for r in rows) == [("NVIDIA H200", 1), ("cpu", 1)]  # never pooled
    cells[3].write_text(json.dumps(moved))
    changed = list(argv)
    changed[changed.index("--remain-samples") + 1] = "5"
    with pytest.raises(SystemExit, match="other settings"):  # finished cells are reused only under the same settings
        benchmark.main(changed)
    earlier = json.loads(cells[2].read_text())
    earlier["settings"]["mask_threshold"] += 1  # a cell measured before the preset's defaults changed
    cells[2].write_text(json.dumps(earlier))
    with pytest.raises(SystemExit, match="other method settings .mask_threshold changed"):
        benchmark.main(argv)


def test_the_run_pipeline_loads_with_diffusers_alone_and_samples_the_same(cnn_task, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", "ddpm-digits", "--pretrained", str(tiny_pipeline_dir), "--class", "3", "--steps", "2",
            "--eval-samples", "2", "--eval-steps", "2", "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    files = (out / "README.md").read_text().split("## Files", 1)[1].split("\n\n", 2)[1]
    loads = [code.replace("RUN/", f"{out}/") for code in re.findall(r"`([^`]+\.from_pretrained\([^`]+\))`", files)]
    assert [code.split(".")[0] for code in loads] == ["UNet2DModel", "DiffusionPipeline"]  # the load that runs no code first
    code_hash = hashlib.sha256((out / "pipeline" / "pipeline.py").read_bytes()).hexdigest()
    assert f"SHA-256 `{code_hash}`" in files
    loads.reverse()
    labels, seed = [0, 3, 9], 5
    expected = load_pipeline(out / "pipeline")(labels, 2.0, 3, torch.Generator().manual_seed(seed), output_type="pt").images
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
torch.set_num_threads({torch.get_num_threads()})  # bit-identical CPU results need the same thread count
from diffusers import DiffusionPipeline, UNet2DModel
pipe = {loads[0]}
denoiser = {loads[1]}
assert all(torch.equal(a, b) for a, b in zip(denoiser.state_dict().values(), pipe.denoiser.state_dict().values()))
images = pipe({labels}, 2.0, 3, torch.Generator().manual_seed({seed}), output_type="pt").images
assert torch.equal(images, torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)), "samples differ"
assert "genunlearn" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
