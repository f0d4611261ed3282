"""The papers' Stable Diffusion protocols as options (I2P judged by NudeNet, COCO captions scored by CLIP score and
FID): prompt CSVs as the references ship them, seeding by row, the nudity counts, the CLIP score from a local folder,
FID against a folder of real images, and the options on `genunlearn evaluate` with their one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from genunlearn.cli import evaluate_main, forget_main, guarded
from genunlearn.data.captioned_digits import VOCABULARY
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.fid import ClassifierFeatures
from genunlearn.eval.clip_score import clip_score, load_clip
from genunlearn.eval.nudity import NUDE_LABELS, as_bgr_uint8, exposed_parts, nudity_figures
from genunlearn.eval.sd_protocols import PromptRow, SDProtocols, measure_rows, read_prompt_table
from genunlearn.models.presets import get_preset
from genunlearn.models.prompt_sampling import sampler_like
from genunlearn.models.tiny_sd import build_tiny_sd
from helpers import accelerate_launch, validate_report

THREE = "a handwritten digit three"
CAPTIONS = ["a handwritten digit one", "a handwritten digit seven in bold strokes", "a handwritten digit two"]


@pytest.fixture(scope="module")
def sd_digits(tmp_path_factory):
    """sd-digits' tiny pipeline, freshly initialised, saved; and a DDIM sampling pipeline of it."""
    folder = tmp_path_factory.mktemp("sd-digits") / "pipeline"
    pipeline = build_tiny_sd(VOCABULARY, **get_preset("sd-digits").model_args)
    pipeline.save_pretrained(folder)
    sampler = sampler_like(pipeline)
    return folder, sampler


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, sd_digits) -> Path:
    """A tiny CLIP model and processor (sd-digits' word tokenizer, 32x32 images) saved as a folder."""
    tokenizer = sd_digits[1].tokenizer
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "projection_dim": 8},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "projection_dim": 8},
        projection_dim=8))
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    lines = [",".join(header)] + [",".join(f'"{v}"' if isinstance(v, str) else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_tables_read_the_references_seed_and_guidance_columns(tmp_path):
    i2p = write_csv(tmp_path / "i2p.csv", ["prompt", "categories", "sd_seed", "sd_guidance_scale"],
                    [["a, b", "sexual", 3920, 7.0], ["c", "hate", 17, 9]])
    esd = write_csv(tmp_path / "coco.csv", ["case_number", "prompt", "evaluation_seed"], [[0, "x", 5], [1, "y", 6], [2, "z", 7]])
    plain = write_csv(tmp_path / "plain.csv", ["prompt"], [["p"], ["q"]])
    assert read_prompt_table(i2p, "--i2p-prompts") == [PromptRow("a, b", 3920, 7.0), PromptRow("c", 17, 9.0)]
    assert read_prompt_table(esd, "--coco-prompts", limit=2) == [PromptRow("x", 5), PromptRow("y", 6)]
    assert read_prompt_table(plain, "--coco-prompts") == [PromptRow("p", 0), PromptRow("q", 1)]
    with pytest.raises(UserError, match="--i2p-prompts .*no such file"):
        read_prompt_table(tmp_path / "missing.csv", "--i2p-prompts")
    with pytest.raises(UserError, match="no 'prompt' column"):
        read_prompt_table(write_csv(tmp_path / "bad.csv", ["text"], [["p"]]), "--coco-prompts")


def test_each_row_is_generated_with_its_own_seed_and_guidance(sd_digits):
    sampler = sd_digits[1]
    rows = [PromptRow(CAPTIONS[0], 11), PromptRow(CAPTIONS[1], 12, 1.0), PromptRow(CAPTIONS[0], 13)]
    images = measure_rows(sampler, rows, lambda image, row: {"image": image}, make_accelerator(), steps=3, guidance=3.0,
                          desc="rows")
    for row, got in zip(rows, images):
        expected = sampler(row.prompt, num_inference_steps=3, guidance_scale=row.guidance or 3.0, output_type="pt",
                           generator=torch.Generator().manual_seed(row.seed)).images * 2 - 1
        torch.testing.assert_close(got["image"], expected, rtol=0, atol=0)
    assert not torch.equal(images[0]["image"], images[2]["image"])  # same prompt, another seed


def test_nudity_counts_parts_above_the_threshold_once_per_image():
    detections = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.8},
         {"class": "FACE_FEMALE", "score": 0.99}],
        [{"class": "FEET_EXPOSED", "score": 0.7}, {"class": "BUTTOCKS_EXPOSED", "score": 0.6}],  # 0.6 is not above 0.6
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.95}],
        [],
    ]
    parts = [exposed_parts(d, threshold=0.6) for d in detections]
    assert parts == [["FEMALE_BREAST_EXPOSED"], ["FEET_EXPOSED"], [], []]
    figures = nudity_figures(parts)
    assert figures["i2p_images"] == 4 and figures["i2p_nude_rate"] == 0.25  # feet alone are not nude
    assert figures["i2p_exposed"]["FEMALE_BREAST_EXPOSED"] == 1 and figures["i2p_exposed"]["FEET_EXPOSED"] == 1
    assert sum(figures["i2p_exposed"].values()) == 2 and "FEET_EXPOSED" not in NUDE_LABELS


def test_the_detector_sees_each_generation_as_its_saved_png_would_load(sd_digits):
    red = torch.full((3, 2, 2), -1.0)
    red[0] = 1.0
    assert as_bgr_uint8(red)[0, 0].tolist() == [0, 0, 255]  # cv2.imread's channel order
    seen = []

    def detector(image: np.ndarray) -> list[dict]:
        seen.append(image)
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.9}] if len(seen) == 1 else []

    rows = [PromptRow(CAPTIONS[0], 1), PromptRow(CAPTIONS[2], 2)]
    figures = SDProtocols(i2p=rows, detector=detector).evaluate(sd_digits[1], make_accelerator(), steps=2, guidance=3.0)
    assert [image.shape for image in seen] == [(8, 8, 3)] * 2 and all(image.dtype == np.uint8 for image in seen)
    assert figures["i2p_images"] == 2 and figures["i2p_nude_rate"] == 0.5


def test_clip_score_loads_a_local_folder_and_is_the_models_own_cosine(clip_dir, sd_digits):
    model, processor = load_clip(clip_dir)
    torch.manual_seed(0)
    scores = []
    for caption in [THREE, *CAPTIONS]:
        image = torch.rand(1, 8, 8) * 2 - 1
        pixels = ((image + 1) * 127.5).round().to(torch.uint8).expand(3, -1, -1)
        with torch.no_grad():  # CLIPModel's forward: logits_per_image = exp(logit_scale) * cosine
            logits = model(**processor(text=[caption], images=[pixels], return_tensors="pt", padding=True,
                                     truncation=True)).logits_per_image
        cosine = (logits / model.logit_scale.exp()).item()
        scores.append(clip_score(model, processor, image, caption))
        assert scores[-1] == pytest.approx(100 * max(cosine, 0), abs=1e-4)
    assert len(set(scores)) > 1
    with pytest.raises(UserError, match="--clip-model .*no CLIP model there"):
        load_clip(clip_dir.parent / "missing")


def test_coco_fid_against_the_generations_own_pngs_is_zero(sd_digits, tmp_path):
    sampler = sd_digits[1]
    rows = [PromptRow(caption, seed) for seed, caption in enumerate(CAPTIONS * 2)]
    images = measure_rows(sampler, rows, lambda image, row: {"image": image[0]}, make_accelerator(), steps=2, guidance=3.0,
                          desc="rows")
    for name, pixels in (("same", lambda a: a), ("inverted", lambda a: 255 - a)):
        folder = tmp_path / name / "val2014"  # nested, as COCO's folders are
        folder.mkdir(parents=True)
        for i, generated in enumerate(images):
            Image.fromarray(pixels(as_bgr_uint8(generated["image"])[..., 0])).save(folder / f"{i}.png")  # grey
    torch.manual_seed(0)
    features = ClassifierFeatures(timm.create_model("test_resnet", pretrained=False, num_classes=4, in_chans=1))
    fid = {name: SDProtocols(coco=rows, inception=features, coco_images=str(tmp_path / name)).evaluate(
        sampler, make_accelerator(), steps=2, guidance=3.0) for name in ("same", "inverted")}
    assert fid["same"]["coco_images"] == 6
    assert abs(fid["same"]["coco_fid"]) < 1e-3 * fid["inverted"]["coco_fid"]


def test_evaluate_runs_the_coco_and_i2p_protocols_and_reports_them(sd_digits, clip_dir, cnn_task, tmp_path):
    pytest.importorskip("nudenet")
    coco = write_csv(tmp_path / "coco.csv", ["case_number", "prompt", "evaluation_seed"],
                     [[i, caption, 100 + i] for i, caption in enumerate(CAPTIONS)])
    i2p = write_csv(tmp_path / "i2p.csv", ["prompt", "sd_seed", "sd_guidance_scale"], [[CAPTIONS[2], 7, 7.5], [THREE, 8, 7.5]])
    out = tmp_path / "eval"
    assert guarded(evaluate_main, ["--model", "sd-digits", "--pretrained", str(sd_digits[0]), "--concept", THREE,
                                   "--eval-samples", "2", "--eval-steps", "2",
                                   "--coco-prompts", str(coco), "--clip-model", str(clip_dir), "--i2p-prompts", str(i2p),
                                   "--protocol-rows", "2", "--output-dir", str(out)]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    metrics = evaluation["metrics"]
    assert metrics["coco_images"] == 2 and 0 <= metrics["coco_clip_score"] <= 100
    assert metrics["i2p_images"] == 2 and metrics["i2p_nude_rate"] == 0.0  # 8x8 digits show no body parts
    assert evaluation["evaluation"]["i2p"]["threshold"] == 0.6 and evaluation["evaluation"]["coco"]["clip_model"] == str(clip_dir)
    assert "coco_clip_score" in (out / "evaluation.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--coco-prompts", "MISSING", "--clip-model", "DIR"], "--coco-prompts .*no such file"),
    (["--coco-prompts", "COCO"], "--coco-prompts needs what to score with"),
    (["--coco-prompts", "COCO", "--clip-model", "MISSING"], "--clip-model .*no CLIP model there"),
    (["--coco-prompts", "COCO", "--coco-images", "DIR"], "pass --fid-inception-weights"),
    (["--coco-prompts", "COCO", "--coco-images", "DIR", "--fid-inception-weights", "MISSING"], "no Inception weights"),
    (["--clip-model", "DIR"], "pass --coco-prompts"),
    (["--i2p-prompts", "COCO", "--nudity-threshold", "1.5"], "--nudity-threshold must be in"),
])
def test_bad_protocol_options_are_one_error_line_before_any_output(args, message, sd_digits, tmp_path, capsys):
    coco = write_csv(tmp_path / "coco.csv", ["prompt"], [[CAPTIONS[0]]])
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (4, 4)).save(real / "0.png")
    args = [{"MISSING": str(tmp_path / "missing"), "COCO": str(coco), "DIR": str(real)}.get(a, a) for a in args]
    out = tmp_path / "eval"
    assert guarded(evaluate_main, ["--model", "sd-digits", "--pretrained", str(sd_digits[0]), "--concept", THREE, *args,
                                   "--output-dir", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not out.exists()


def test_protocol_options_are_refused_on_a_class_conditional_model(tmp_path, capsys):
    coco = write_csv(tmp_path / "coco.csv", ["prompt"], [["x"]])
    assert guarded(evaluate_main, ["--model", "ddpm-digits", "--class", "3", "--coco-prompts", str(coco),
                                   "--output-dir", str(tmp_path / "eval")]) != 0
    assert "text-to-image" in capsys.readouterr().err



def test_an_erasure_reports_the_protocols_before_and_after(sd_digits, clip_dir, cnn_task, tmp_path):
    coco = write_csv(tmp_path / "coco.csv", ["prompt", "evaluation_seed"], [[caption, 5] for caption in CAPTIONS])
    out = tmp_path / "run"
    assert guarded(forget_main, ["--model", "sd-digits", "--pretrained", str(sd_digits[0]), "--concept", THREE,
                                 "--method", "sfron", "--steps", "2", "--batch-size", "2", "--eval-samples", "2",
                                 "--eval-steps", "2", "--data-free-samples", "2", "--coco-prompts", str(coco),
                                 "--clip-model", str(clip_dir), "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["before"]["coco_images"] == report["after"]["coco_images"] == 3
    assert all(0 <= report[when]["coco_clip_score"] <= 100 for when in ("before", "after"))
    assert report["evaluation"]["coco"]["prompts"] == str(coco)
    assert "| coco_clip_score |" in (out / "report.md").read_text()


def test_two_processes_generate_each_row_as_one_process_does(sd_digits, cache_dir, tmp_path):
    worker = Path(__file__).parent / "workers" / "protocol_rows_dump.py"
    dumps = {}
    for processes in (1, 2):
        out = tmp_path / f"rows-{processes}.safetensors"
        done = accelerate_launch(worker, [str(sd_digits[0]), str(out)], cache_dir, processes=processes, port=29563)
        assert done.returncode == 0, done.stderr[-2000:]
        dumps[processes] = load_file(out)
    assert dumps[1]["processes"].tolist() == [0] * 5 and set(dumps[2]["processes"].tolist()) == {0, 1}
    torch.testing.assert_close(dumps[2]["images"], dumps[1]["images"], rtol=0, atol=1e-5)  # row order and seeds kept
