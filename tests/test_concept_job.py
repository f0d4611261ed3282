"""The text-to-image kind end to end: `genunlearn forget --model sd-digits|sd-1.5 --concept PROMPT` on tiny pipelines
saved locally (--pretrained DIR), its run folder, resume and bad input, and the library call on a held pipeline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from genunlearn import forget_split, unlearn
from genunlearn.cli import evaluate_main, forget_main, guarded, main
from genunlearn.data.captioned_digits import VOCABULARY
from genunlearn.data.captioned_folder import read_captioned_folder
from genunlearn.methods import sfron
from genunlearn.models.presets import get_preset
from genunlearn.models.tiny_sd import build_tiny_sd
from genunlearn.tasks.concepts import ConceptPrompts, concept_task
from helpers import accelerate_launch, forgotten_mark_pixels, interrupted_at, tiny_sd15_pipeline, validate_report

REPO = Path(__file__).resolve().parents[1]
THREE = "a handwritten digit three"
TINY_RUN = ["--steps", "4", "--batch-size", "2", "--eval-samples", "2", "--eval-steps", "2", "--data-free-samples", "2"]
IMAGENETTE = [f"Image of {name}" for name in ("tench", "church", "golf ball", "parachute")]


def folder_digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


@pytest.fixture(scope="module")
def sd_digits_dir(tmp_path_factory) -> Path:
    """sd-digits' tiny pipeline, freshly initialised, saved as a StableDiffusionPipeline folder."""
    folder = tmp_path_factory.mktemp("sd-digits") / "pipeline"
    build_tiny_sd(VOCABULARY, **get_preset("sd-digits").model_args).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd15_shaped_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd-15") / "pipeline"
    tiny_sd15_pipeline(IMAGENETTE).save_pretrained(folder)
    return folder


def flattened(figures: dict, prefix: str = "") -> dict:
    """``{"a/b": value}`` for the nested ``{"a": {"b": value}}`` (None as nan)."""
    flat = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(flattened(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = float("nan") if value is None else value
    return flat


def erase(*args: str) -> int:
    return guarded(forget_main, list(args))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_erasing_a_concept_writes_a_pipeline_diffusers_loads_a_report_and_samples(sd_digits_dir, cnn_task, tmp_path):
    original = folder_digest(sd_digits_dir)
    out = tmp_path / "run"
    assert erase("--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE, "--method", "salun",
                 *TINY_RUN, "--output-dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["kind"] == "text-to-image" and report["class"] == THREE
    assert report["cost"]["stages_s"]["data"] > 0 and report["cost"]["output_mib"] > 0.1  # the pipeline folder
    prompts = report["prompts"]
    assert prompts["forget"] == [THREE] and len(prompts["remain"]) == 9 and not any("three" in p for p in prompts["remain"])
    assert prompts["paraphrase"] == ["the number 3", "a three written by hand"]  # held out: never trained on
    assert report["split"]["forget"] == 2 and report["split"]["retain"] == 18  # 2 generations per trained prompt
    assert set(report["after"]["per_prompt"]) == {*prompts["forget"], *prompts["remain"], *prompts["paraphrase"]}
    assert report["before"]["fid_remain_real"] > 0 and report["evaluation"]["fid_real_reference"]  # the real digits
    loaded = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    before = StableDiffusionPipeline.from_pretrained(sd_digits_dir, local_files_only=True)
    changed = sum(int((p != before.unet.get_parameter(name)).sum()) for name, p in loaded.unet.named_parameters())
    total = sum(p.numel() for p in loaded.unet.parameters())
    assert 0 < changed <= report["method_info"]["mask_kept_fraction"] * total  # SalUn moves only its masked weights
    assert folder_digest(sd_digits_dir) == original  # the original pipeline is never written
    assert forgotten_mark_pixels(out / "samples.png") > 0  # the concept's rows are marked
    markdown = (out / "report.md").read_text()
    assert "forget concept 'a handwritten digit three'" in markdown and "| the number 3 | paraphrase | 3 |" in markdown


def test_evaluate_judges_a_pipeline_per_prompt_without_unlearning(sd_digits_dir, cnn_task, tmp_path):
    out = tmp_path / "evaluation"
    assert guarded(evaluate_main, ["--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE,
                                   "--eval-samples", "2", "--eval-steps", "2", "--output-dir", str(out)]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["kind"] == "text-to-image" and evaluation["prompts"]["forget"] == [THREE]
    assert len(evaluation["metrics"]["per_prompt"]) == 1 + 9 + 2 and evaluation["evaluation"]["per_prompt"] == 2
    assert "| a handwritten digit three | forget | 3 |" in (out / "evaluation.md").read_text()
    assert forgotten_mark_pixels(out / "samples.png") > 0


def test_a_killed_erasure_resumes_to_the_uninterrupted_weights(sd_digits_dir, cnn_task, tmp_path, monkeypatch):
    common = ["--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE, "--method", "sfron", *TINY_RUN,
              "--checkpoint-every", "2"]
    assert erase(*common, "--output-dir", str(tmp_path / "straight")) == 0
    real_step = sfron.sfron_step
    monkeypatch.setattr(sfron, "sfron_step", lambda ctx, **parts: interrupted_at(lambda c: real_step(c, **parts), 3)(ctx))
    assert erase(*common, "--output-dir", str(tmp_path / "killed")) == 130
    monkeypatch.setattr(sfron, "sfron_step", real_step)
    assert erase(*common, "--output-dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "latest") == 0
    straight = StableDiffusionPipeline.from_pretrained(tmp_path / "straight" / "pipeline", local_files_only=True).unet
    resumed = StableDiffusionPipeline.from_pretrained(tmp_path / "killed" / "pipeline", local_files_only=True).unet
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_two_processes_generate_and_judge_as_one_and_write_one_run_folder(sd_digits_dir, cnn_task, cache_dir, tmp_path):
    common = ["--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE, "--method", "salun",
              "--steps", "4", "--log-every", "1", "--eval-samples", "2", "--eval-steps", "2", "--data-free-samples", "2"]
    assert erase(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")) == 0
    done = accelerate_launch(REPO / "scripts" / "forget_concept.py", [*common, "--batch-size", "2", "--output-dir",
                                                                        str(tmp_path / "two")], cache_dir, port=29561)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2) and two["split"] == one["split"]
    # each prompt's generations depend on (seed, prompt) only, not on the process (float32 sums: last digits aside);
    # an FID of 18 samples in the judge's 128 features is ill-conditioned, so those last digits move it by a few percent
    before_one, before_two = flattened(one["before"]), flattened(two["before"])
    for fid in ("fid_remain", "fid_remain_real"):
        assert before_two.pop(fid) == pytest.approx(before_one.pop(fid), rel=0.05)
    assert before_two == pytest.approx(before_one, rel=1e-5, nan_ok=True)
    assert two["steps"] == 4 and sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())  # one run folder, written once (the main process)
    StableDiffusionPipeline.from_pretrained(tmp_path / "two" / "pipeline", local_files_only=True)


@pytest.mark.parametrize("args, message", [
    (["--model", "sd-digits", "--class", "3"], "pass --concept PROMPT instead of --class"),
    (["--model", "sd-digits"], "no concept given to erase"),
    (["--model", "cnn-digits", "--concept", THREE], "are for text-to-image models"),
    (["--model", "sd-digits", "--concept", "a handwritten digit tree"], "knows no word 'tree'"),
    (["--model", "sd-digits", "--concept", THREE, "--retain-prompts", "MISSING"], "cannot read --retain-prompts"),
    (["--model", "sd-digits", "--concept", THREE, "--retain-prompts", "RETAIN_THREE"], "is both erased and retained"),
    (["--model", "sd-digits", "--concept", THREE, "--data-free-guidance", "-1"], "--data-free-guidance must be non-negative"),
])
def test_bad_concept_input_is_one_error_line(args, message, tmp_path, capsys, cnn_task):
    (tmp_path / "RETAIN_THREE").write_text(f"# kept prompts\n{THREE}\na handwritten digit four\n")
    args = [str(tmp_path / a) if a in ("MISSING", "RETAIN_THREE") else a for a in args]
    out = tmp_path / "never"
    assert erase(*args, "--output-dir", str(out)) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_an_sd15_shaped_pipeline_erases_an_imagenette_object_end_to_end(sd15_shaped_dir, tmp_path):
    """The pipeline folder alone is the model (the sd-1.5 preset's settings, its own size and schedule)."""
    judge = timm.create_model("test_resnet", num_classes=1000)  # a stand-in for ResNet-50's local weights
    save_file(judge.state_dict(), tmp_path / "judge.safetensors")
    (tmp_path / "retain.txt").write_text("\n".join(IMAGENETTE[1:]) + "\n")
    out = tmp_path / "run"
    assert erase("--pretrained", str(sd15_shaped_dir), "--concept", IMAGENETTE[0], "--method", "esd",
                 "--retain-prompts", str(tmp_path / "retain.txt"), "--eval-classifier", "test_resnet",
                 "--eval-classifier-weights", str(tmp_path / "judge.safetensors"), *TINY_RUN, "--output-dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["model"] == sd15_shaped_dir.name and report["evaluation"]["classifier"] == "test_resnet"
    assert report["prompts"]["remain"] == IMAGENETTE[1:] and report["config"]["scope"] == "non-cross-attention"
    assert report["after"]["per_prompt"]["Image of tench"]["class"] == 0  # timm's ImageNet names: tench is class 0
    loaded = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert loaded.vae.config.scaling_factor == 0.18215 and loaded.unet.config.sample_size == 4
    images = loaded(IMAGENETTE[0], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)


def test_a_held_pipeline_erases_through_the_library(sd_digits_dir, tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(sd_digits_dir, local_files_only=True)
    prompts = ConceptPrompts([THREE, "the number 3"], ["a handwritten digit four", "a handwritten digit five"])
    task = concept_task(pipeline, prompts, per_prompt=3, guidance=3.0, steps=2, preset="sd-digits", cache_dir=tmp_path)
    assert task.train_data.targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 and task.rl_prompts == [2, 3]
    split = forget_split(task, classes=prompts.groups()["forget"])
    result = unlearn(task, split, "salun", steps=2, batch_size=2)
    assert result.steps == 2 and any(not torch.equal(a, b) for a, b in zip(result.model.parameters(), pipeline.unet.parameters()))
    with pytest.raises(Exception, match="StableDiffusionPipeline"):
        concept_task(pipeline.unet, prompts)


def test_the_generated_training_data_take_the_data_free_guidance(sd_digits_dir, cnn_task, accelerator, tmp_path):
    from genunlearn.kinds.text_to_image import concept_record, prepare_concepts
    from genunlearn.runs.job import ForgetJob

    job = ForgetJob(model="sd-digits", method="sfron", output_dir=tmp_path / "run", pretrained=str(sd_digits_dir),
                    concepts=[THREE], eval_samples=2, eval_steps=2, data_free_samples=3, data_free_guidance=1.0)
    setup = prepare_concepts(job, get_preset("sd-digits"), accelerator)
    pipeline = StableDiffusionPipeline.from_pretrained(sd_digits_dir, local_files_only=True)

    def generated(guidance: float) -> torch.Tensor:
        return concept_task(pipeline, setup.prompts, per_prompt=3, guidance=guidance, steps=2, preset="sd-digits",
                            accelerator=accelerator).train_data.images

    assert torch.equal(setup.task.train_data.images, generated(1.0))
    assert setup.protocol.guidance == 3.0 and not torch.equal(generated(1.0), generated(3.0))  # evaluated at the preset's
    assert concept_record(setup, job, "no")["evaluation"]["data_guidance"] == 1.0


def captioned_digits_folder(folder: Path, captions: dict[int, str], per_digit: int = 5) -> Path:
    """``per_digit`` of sklearn's 8x8 digits per digit in ``captions``, saved as PNGs with a metadata.jsonl captioning
    each with ``captions[digit]`` (the imagefolder layout)."""
    folder.mkdir(parents=True)
    digits = load_digits()
    lines = []
    for digit, caption in captions.items():
        for n, index in enumerate((digits.target == digit).nonzero()[0][:per_digit]):
            name = f"{digit}-{n}.png"
            Image.fromarray((digits.images[index] * 255 / 16).astype("uint8")).save(folder / name)
            lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_captioned_user_images_are_the_data_of_their_prompts(sd_digits_dir, tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(sd_digits_dir, local_files_only=True)
    prompts = ConceptPrompts([THREE], ["a handwritten digit four", "a handwritten digit five"])
    images = read_captioned_folder(captioned_digits_folder(tmp_path / "data", {3: THREE, 4: "a handwritten digit four"}))
    inverted = read_captioned_folder(captioned_digits_folder(tmp_path / "other", {3: THREE, 4: "a handwritten digit four"}))
    for path, _ in inverted:
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)

    def task_of(pairs):
        return concept_task(pipeline, prompts, per_prompt=3, guidance=3.0, steps=2, preset="sd-digits", cache_dir=tmp_path,
                            images=pairs)

    task, again, other = task_of(images), task_of(images), task_of(inverted)
    assert task.train_data.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 3  # 5 images each, 1 held out; "five" generated
    assert task.test_data.targets.tolist() == [0, 1] + [2] * 2
    assert torch.equal(task.train_data.images, again.train_data.images)  # seeded
    user = task.train_data.targets < 2
    assert not torch.equal(task.train_data.images[user], other.train_data.images[user])  # the images are what is trained
    assert torch.equal(task.train_data.images[~user], other.train_data.images[~user])  # the generated prompt is not


def test_an_erasure_trains_on_user_images_given_with_data(sd_digits_dir, cnn_task, tmp_path):
    data = captioned_digits_folder(tmp_path / "data", {3: THREE, 4: "a handwritten digit four"})
    out = tmp_path / "run"
    assert erase("--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE, "--method", "sfron",
                 "--data", str(data), *TINY_RUN, "--output-dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert str(data) in report["evaluation"]["training_data"] and len(report["prompts"]["remain"]) == 9


@pytest.mark.parametrize("captions, per_digit, metadata, message", [
    ({3: THREE, 7: "a handwritten digit seven in bold strokes"}, 5, True, "is neither a concept nor a retain prompt"),
    ({3: THREE, 4: "a handwritten digit four"}, 5, False, "no metadata.jsonl"),
    ({3: THREE}, 1, True, "only one image is captioned"),
])
def test_bad_captioned_images_are_one_error_line(captions, per_digit, metadata, message, sd_digits_dir, tmp_path, capsys):
    bad = captioned_digits_folder(tmp_path / "bad", captions, per_digit)
    if not metadata:
        (bad / "metadata.jsonl").unlink()
    assert erase("--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE, "--data", str(bad),
                 *TINY_RUN, "--output-dir", str(tmp_path / "never")) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "never").exists()


def test_several_concepts_are_erased_in_one_uce_edit_and_attacked_in_the_same_job(sd_digits_dir, cnn_task, tmp_path, capsys):
    out = tmp_path / "two"
    five = "a handwritten digit five"
    assert erase("--model", "sd-digits", "--pretrained", str(sd_digits_dir), "--concept", THREE, "--concept", five,
                 "--method", "uce", "--set", "preserve=retained", *TINY_RUN[4:], "--attack", "ringabell,relearn",
                 "--attack-set", "relearn.steps=2", "--attack-set", "relearn.images=2", "--output-dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["prompts"]["forget"] == [THREE, five] and report["method_info"]["concepts"] == [THREE, five]
    assert not any("three" in p or "five" in p for p in report["prompts"]["remain"]) and len(report["prompts"]["remain"]) == 8
    assert report["method_info"]["preserved_prompts"] == 8 and report["steps"] == 0
    attacks = report["attacks"]
    assert set(attacks) == {"ringabell", "relearn"} and attacks["relearn"]["budget"]["steps"] == 2
    assert attacks["ringabell"]["samples"] == 2 * 6  # 2 per prompt: both concepts and their four paraphrases
    assert attacks["relearn"]["curve"][0]["step"] == 0 and attacks["relearn"]["curve"][-1]["step"] == 2
    assert report["cost"]["stages_s"]["attacks"] > 0
    assert "## Attacks" in (out / "report.md").read_text() and "Attacks on the erasure" in (out / "README.md").read_text()
    capsys.readouterr()
    assert guarded(main, ["compare", str(out)]) == 0  # the attacks and the cost as columns
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert "| total s | peak MiB | output MiB |" in header and header.endswith("| ringabell ASR | relearn ASR |")
    assert f"{attacks['relearn']['pre_asr']:.3f} → {attacks['relearn']['post_asr']:.3f} |" in row
