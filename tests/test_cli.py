"""The main job through the CLI: report schema, resume, and every bad input (one line, exit 2, nothing overwritten)."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from genunlearn.cli import evaluate_main, forget_main, guarded, main, parse_axis, parse_setting, sweep_main
from genunlearn.data.digits import load_digits_split
from genunlearn.eval.report import METRIC_KEYS, REQUIRED_KEYS
from genunlearn.methods import random_label
from helpers import export_digits_folder, interrupted_at, unreadable_files, validate_report

REPO = Path(__file__).resolve().parents[1]


def forget(*args: str) -> int:
    return guarded(forget_main, ["--model", "cnn-digits", *args])


@pytest.fixture(scope="module")
def finished_run(cnn_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rl"
    assert forget("--class", "3", "--method", "random_label", "--output-dir", str(out)) == 0
    return out


def test_report_schema(finished_run):
    assert unreadable_files(finished_run) == []  # model.safetensors and the PNGs as readable as report.json
    report = json.loads((finished_run / "report.json").read_text())
    card = (finished_run / "README.md").read_text()  # the model card, read back as the hub reads it
    from huggingface_hub import ModelCard

    metadata = ModelCard(card).data.to_dict()
    assert metadata == {"library_name": "timm", "tags": ["genunlearn", "machine-unlearning", "random_label"]}
    assert f"| forget_acc | {report['before']['forget_acc']:.4f} | {report['after']['forget_acc']:.4f} |" in card
    validate_report(report)
    for broken in ({**report, "after": {**report["after"], "forget_acc": 1.5}}, {k: v for k, v in report.items() if k != "split"}):
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)
    assert set(REQUIRED_KEYS) <= set(report)
    assert (report["model"], report["class"], report["method"]) == ("cnn-digits", 3, "random_label")
    assert report["steps"] == report["config"]["steps"] > 0 and report["wall_time_s"] > 0
    for phase in ("before", "after"):
        assert all(0.0 <= report[phase][key] <= 1.0 for key in METRIC_KEYS)
    assert report["after"]["forget_acc"] <= 0.05 <= report["before"]["forget_acc"]
    assert report["split"]["forget"] + report["split"]["retain"] == 1437
    assert report["log"] and report["log"][-1]["step"] == report["steps"]
    assert (finished_run / "model" / "model.safetensors").is_file() and (finished_run / "report.md").is_file()
    cost = report["cost"]  # every stage that ran timed, memory and output measured
    assert list(cost["stages_s"]) == ["data", "evaluation_before", "unlearning", "evaluation_after", "exports", "writing"]
    assert all(seconds > 0 for seconds in cost["stages_s"].values())
    assert cost["total_s"] == pytest.approx(sum(cost["stages_s"].values())) and cost["total_s"] > report["wall_time_s"] * 0.99
    assert cost["peak_rss_mib"] > 100 and cost["cuda_peak_mib"] is None and cost["device"] == "cpu"
    weights = (finished_run / "model" / "model.safetensors").stat().st_size / 2**20
    assert weights < cost["output_mib"] < weights + 5
    assert "## Cost" in (finished_run / "report.md").read_text() and "Cost: " in card
    assert "| forget_acc |" in (finished_run / "report.md").read_text()
    assert not (finished_run / "checkpoints").exists()


def test_classifier_reports_have_a_per_class_table_with_the_forgotten_class_marked(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    test = load_digits_split()[1]
    for phase in ("before", "after"):
        per_class = report[phase]["per_class_acc"]
        assert sorted(per_class, key=int) == [str(c) for c in range(10)]
        shares = {c: sum(1 for _, label in test if label == c) / len(test) for c in range(10)}
        overall = sum(per_class[str(c)] * shares[c] for c in range(10))  # the classes' accuracies weighted by size
        everything = (report[phase]["forget_test_acc"] * shares[3] + report[phase]["test_acc"] * (1 - shares[3]))
        assert overall == pytest.approx(everything, abs=1e-9)
        assert per_class["3"] == pytest.approx(report[phase]["forget_test_acc"])
    markdown = (finished_run / "report.md").read_text()
    after = report["after"]["per_class_acc"]
    assert f"| **3 (forgotten)** | {report['before']['per_class_acc']['3']:.4f} | {after['3']:.4f} |" in markdown
    assert f"| 4 | {report['before']['per_class_acc']['4']:.4f} | {after['4']:.4f} |" in markdown


PROVENANCE = ("environment", "command", "genunlearn_revision", "started_at", "finished_at")


def test_reports_record_what_they_ran_on_and_version_1_reports_still_validate(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    assert report["schema_version"] == 2
    environment = report["environment"]
    assert environment["torch"] == torch.__version__ and environment["device_type"] == "cpu" and environment["device_name"]
    assert environment["processes"] == 1 and environment["threads"] == torch.get_num_threads()
    assert {"diffusers", "accelerate", "timm", "torchmetrics", "python"} <= set(environment)
    assert isinstance(report["command"], list) and report["genunlearn_revision"]
    assert report["started_at"] <= report["finished_at"] and report["finished_at"].endswith("Z")
    version_1 = {**{k: v for k, v in report.items() if k not in PROVENANCE}, "schema_version": 1}
    validate_report(version_1)  # reports written before provenance
    with pytest.raises(jsonschema.ValidationError):
        validate_report({**version_1, "schema_version": 2})  # version 2 must say what it ran on


def test_evaluate_reproduces_a_runs_figures(finished_run, tmp_path):
    """``genunlearn evaluate`` of the unlearned weights gives the run's "after" figures; per-class test accuracy
    averages (weighted by class size) to the accuracy on all test images."""
    argv = ["--model", "cnn-digits", "--pretrained", str(finished_run / "model"), "--class", "3", "--output-dir", str(tmp_path / "e")]
    assert guarded(evaluate_main, argv) == 0
    metrics = json.loads((tmp_path / "e" / "evaluation.json").read_text())["metrics"]
    after = json.loads((finished_run / "report.json").read_text())["after"]
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(after[key])
    test = load_digits_split()[1]
    sizes = torch.bincount(test.targets, minlength=10).double()
    per_class = torch.tensor([metrics["per_class_acc"][str(c)] for c in range(10)]).double()
    assert float((per_class * sizes).sum() / sizes.sum()) == pytest.approx(metrics["test_acc_all"])
    assert metrics["per_class_acc"]["3"] <= 0.05 < min(v for c, v in metrics["per_class_acc"].items() if c != "3")
    assert "| forget_acc |" in (tmp_path / "e" / "evaluation.md").read_text()
    assert guarded(evaluate_main, argv) == 2  # never writes into a used folder


def test_seeds_report_mean_and_std(cnn_task, tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = ["--class", "3", "--method", "random_label", "--steps", "4", "--seeds", "0", "1", "2", "--output-dir", str(out)]
    assert forget(*argv) == 0
    assert "±" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    reports = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1, 2)]
    assert summary["seeds"] == [0, 1, 2] and [r["config"]["seed"] for r in reports] == [0, 1, 2]
    for phase in ("before", "after"):
        for key in ("forget_acc", "retain_acc", "test_acc", "mia"):
            values = [r[phase][key] for r in reports]
            assert summary[phase][key]["values"] == values
            assert summary[phase][key]["mean"] == pytest.approx(statistics.mean(values))
            assert summary[phase][key]["std"] == pytest.approx(statistics.stdev(values))
    assert summary["before"]["forget_acc"]["std"] == 0.0  # the same pretrained model before every seed
    assert "| retain_acc |" in (out / "summary.md").read_text() and " ± " in (out / "summary.md").read_text()
    first = (out / "seed-0" / "report.json").stat().st_mtime_ns
    assert forget(*argv[:-1], str(out)) == 0  # finished seeds are reused, not rerun
    assert (out / "seed-0" / "report.json").stat().st_mtime_ns == first


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model", "--class", "3"], "unknown model 'no-such-model'"),
        (["--model", "cnn-digits", "--class", "3", "--method", "no-such-method"], "unknown method 'no-such-method'"),
        (["--model", "cnn-digits", "--class", "10"], "class 10 is out of range"),
        (["--model", "cnn-digits", "--class", "3", "--steps", "0"], "steps must be at least 1"),
        (["--model", "cnn-digits", "--class", "3", "--pretrained", "/nonexistent/w.safetensors"], "does not exist"),
        (["--model", "cnn-digits", "--class", "3", "--random-fraction", "0.1"], "exactly one of"),
        (["--model", "ddpm-digits", "--class", "3", "--random-fraction", "0.1"], "exactly one of"),
        (["--model", "cnn-digits", "--class", "3", "--report_to", "no-such-tracker"], "unknown --report_to 'no-such-tracker'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, cnn_task, tmp_path, capsys):
    assert guarded(forget_main, [*args, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out" / "report.json").exists()


def test_corrupt_weights_file(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a safetensors file at all")
    assert forget("--class", "3", "--pretrained", str(weights), "--output-dir", str(tmp_path / "out")) == 2
    assert "corrupt" in _one_error_line(capsys)
    assert weights.read_bytes() == b"not a safetensors file at all"


def test_class_with_no_samples(cnn_task, tmp_path, capsys):
    data = export_digits_folder(tmp_path / "data", per_class=6, empty_class=4)
    assert forget("--class", "3", "--data", str(data), "--output-dir", str(tmp_path / "out")) == 2
    assert "digit4 holds no images" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_output_dir_holding_a_different_run_is_untouched(finished_run, capsys):
    before = _snapshot(finished_run)
    assert forget("--class", "5", "--method", "random_label", "--output-dir", str(finished_run)) == 2
    assert "holds a different run (differs in classes)" in _one_error_line(capsys)
    assert forget("--class", "3", "--method", "random_label", "--output-dir", str(finished_run)) == 2
    assert "already holds this finished run" in _one_error_line(capsys)
    assert _snapshot(finished_run) == before


def test_foreign_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert forget("--class", "3", "--output-dir", str(tmp_path)) == 2
    assert "holds no genunlearn run" in _one_error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_killed_job_resumes_to_the_same_weights(cnn_task, tmp_path, monkeypatch, capsys):
    common = ["--class", "3", "--method", "random_label", "--steps", "40", "--checkpoint-every", "10"]
    assert forget(*common, "--output-dir", str(tmp_path / "straight")) == 0
    real_step = random_label.random_label_step
    monkeypatch.setattr(random_label, "random_label_step", interrupted_at(real_step, 25))
    assert forget(*common, "--output-dir", str(tmp_path / "killed")) == 130
    monkeypatch.setattr(random_label, "random_label_step", real_step)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    capsys.readouterr()
    assert forget(*common, "--output-dir", str(tmp_path / "killed")) == 2
    assert "--resume_from_checkpoint latest" in _one_error_line(capsys)
    assert forget(*common, "--output-dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "latest") == 0
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_script_runs_as_a_process_and_errors_without_traceback(cache_dir, tmp_path):
    env = {**os.environ, "GENUNLEARN_CACHE": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "forget_class.py"), "--model", "cnn-digits", "--class", "42"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: class 42 is out of range")


def test_listing_commands(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("retrain", "finetune", "grad_ascent", "random_label"))
    assert main(["models"]) == 0 and "resnet18-digits" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_out_of_memory_names_the_flags_that_help(monkeypatch, capsys):
    import genunlearn.runs.forget

    def exhausted(job, accelerator=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(genunlearn.runs.forget, "run_forget_job", exhausted)
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size" in err and "--gradient-checkpointing" in err and "--mixed-precision" in err
    assert "configs/accelerate/fsdp.yaml" in err


def test_compare_retrain_and_relearning_on_cnn_digits(cnn_task, tmp_path, capsys):
    """The oracle is trained once and cached; relearning curves start at each model's forget accuracy."""
    out = tmp_path / "run"
    argv = ["--model", "cnn-digits", "--class", "3", "--compare-retrain", "--relearn-steps", "8", "--output-dir", str(out)]
    assert guarded(forget_main, argv) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    oracle, gap = report["oracle"], report["gap_to_oracle"]
    assert oracle["forget_acc"] < 0.05 and oracle["retain_acc"] > 0.95  # the oracle never saw class 3
    assert gap["forget_acc"] == pytest.approx(report["after"]["forget_acc"] - oracle["forget_acc"])
    relearn = report["relearn"]
    assert [p["step"] for p in relearn["unlearned"]] == [0, 2, 4, 6, 8] == [p["step"] for p in relearn["retrain"]]
    assert relearn["unlearned"][0]["forget_acc"] == pytest.approx(report["after"]["forget_acc"])
    assert relearn["retrain"][0]["forget_acc"] == pytest.approx(oracle["forget_acc"])
    assert relearn["unlearned"][-1]["forget_acc"] > relearn["unlearned"][0]["forget_acc"]  # fine-tuning does bring it back
    markdown = (out / "report.md").read_text()
    assert "## Retrain oracle" in markdown and "## Relearning check" in markdown
    average = statistics.mean(abs(gap[k]) for k in ("forget_acc", "retain_acc", "test_acc", "mia"))  # SalUn's Avg. Gap
    assert f"Average gap (mean absolute gap over forget_acc, retain_acc, test_acc, mia, as SalUn's tables): {average:.4f}" in markdown
    capsys.readouterr()
    assert main(["compare", str(out)]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert header.endswith("| gap forget_acc | gap retain_acc | gap test_acc | gap mia | avg gap |")
    assert row.endswith(f"| {gap['forget_acc']:+.3f} | {gap['retain_acc']:+.3f} | {gap['test_acc']:+.3f} | {gap['mia']:+.3f} | {average:.3f} |")
    cached = list((Path(os.environ["GENUNLEARN_CACHE"]) / "retrain").iterdir())
    assert guarded(forget_main, [*argv[:-1], str(tmp_path / "again")]) == 0
    assert list((Path(os.environ["GENUNLEARN_CACHE"]) / "retrain").iterdir()) == cached  # reused, not retrained


def test_compare_puts_runs_side_by_side(cnn_task, tmp_path, capsys):
    for method in ("sfron", "random_label"):
        assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--method", method,
                                     "--output-dir", str(tmp_path / method)]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "sfron"), str(tmp_path / "random_label"), "--output", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out.splitlines()
    reports = [json.loads((tmp_path / m / "report.json").read_text()) for m in ("sfron", "random_label")]
    assert table[0].startswith("| run | model | method |") and len([row for row in table if row.startswith("| sfron")]) == 1
    row = next(row for row in table if row.startswith("| random_label"))
    assert f"{reports[1]['before']['forget_acc']:.3f} → {reports[1]['after']['forget_acc']:.3f}" in row
    assert table[0].startswith("| run | model | method | class | steps | time s | total s | peak MiB | output MiB |")
    assert f"| {reports[1]['cost']['total_s']:.1f} | {reports[1]['cost']['peak_rss_mib']:.0f} |" in row
    sfron = reports[0]["cost"]["stages_s"]  # its masks' time is split out of the method's own
    assert sfron["statistics"] == pytest.approx(reports[0]["method_info"]["mask_time_s"])
    assert sfron["statistics"] + sfron["unlearning"] >= reports[0]["wall_time_s"]
    assert (tmp_path / "cmp.md").is_file() and (tmp_path / "cmp.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path)]) == 2
    assert "holds no report.json" in capsys.readouterr().err


def test_sweep_runs_each_cell_once_and_frames_the_robust_window(cnn_task, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--model", "cnn-digits", "--class", "3", "--method", "sfron", "--set", "lr=1e-6,0.05,0.1", "steps=5,10",
            "--target", "forget_acc<=0.05", "--output-dir", str(out)]
    assert guarded(sweep_main, argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [c["settings"] for c in sweep["cells"]] == [{"lr": lr, "steps": n} for lr in (1e-6, 0.05, 0.1) for n in (5, 10)]
    meets = {}
    for cell in sweep["cells"]:
        report = json.loads((out / cell["folder"] / "seed-0" / "report.json").read_text())
        assert report["config"]["lr"] == cell["settings"]["lr"] and report["steps"] == cell["settings"]["steps"]
        assert cell["figures"]["forget_acc"]["values"] == [report["after"]["forget_acc"]]
        assert cell["meets"] == (report["after"]["forget_acc"] <= 0.05)
        meets[tuple(cell["index"])] = cell["meets"]
    for cell in sweep["cells"]:  # robust: the cell and its neighbours along each axis all meet the targets
        r, c = cell["index"]
        around = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)) if (r + dr, c + dc) in meets]
        assert cell["robust"] == (meets[(r, c)] and all(meets[n] for n in around))
    assert [meets[(0, c)] for c in (0, 1)] == [False, False] and all(meets[(r, c)] for r in (1, 2) for c in (0, 1))
    assert [c["robust"] for c in sweep["cells"]] == [False, False, False, False, True, True]
    table = (out / "sweep.md").read_text()
    assert table.count("| yes | yes |") == 2 and (out / "heatmap.png").stat().st_size > 5000

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-0/report.json")}
    assert guarded(sweep_main, argv) == 0  # a rerun reuses every finished cell
    assert len(stamps) == 6 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    capsys.readouterr()
    for bad, message in ((["--set", "lr"], "KEY=V1,V2"), (["--set", "lr=1", "--target", "fid<=1"], "forget_acc<=0.05")):
        with pytest.raises(SystemExit) as exited:
            sweep_main([*argv[:6], *bad, "--output-dir", str(tmp_path / "x")])
        assert exited.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_setting_values_read_numbers_as_numbers():
    assert parse_setting("lr=1e-4") == ("lr", 1e-4) and parse_setting("forget-clip=null") == ("forget_clip", None)
    assert parse_setting("forget_objective=adaga") == ("forget_objective", "adaga")
    assert parse_setting("fisher_noise=1e-9") == ("fisher_noise", 1e-9) and parse_setting("lr=1e30") == ("lr", 1e30)
    assert math.isnan(parse_setting("lr=nan")[1]) and parse_setting("joint=true") == ("joint", True)


@pytest.mark.parametrize("setting, message", [("joint=maybe", "takes true or false"), ("steps=abc", "takes a whole number"),
                                              ("lr=nan", "finite number"), ("lr=inf", "finite number")])
def test_a_mistyped_setting_is_one_error_line_before_any_work(setting, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--set", setting, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not out.exists()
    assert parse_axis("lr=5e-5,1e-4") == ("lr", [5e-5, 1e-4]) and parse_axis("steps=10,20") == ("steps", [10, 20])


DIFFUSERS_SPELLINGS = [
    (["--output_dir", "o"], ["--output-dir", "o"]),
    (["--mixed_precision", "bf16"], ["--mixed-precision", "bf16"]),
    (["--gradient_checkpointing"], ["--gradient-checkpointing"]),
    (["--train_batch_size", "16"], ["--batch-size", "16"]),
    (["--learning_rate", "0.002"], ["--lr", "0.002"]),
    (["--max_train_steps", "7"], ["--steps", "7"]),
    (["--pretrained_model_name_or_path", "w.safetensors"], ["--pretrained", "w.safetensors"]),
    (["--checkpointing_steps", "5"], ["--checkpoint-every", "5"]),
    (["--checkpoints_total_limit", "3"], ["--checkpoints-total-limit", "3"]),
    (["--cache_dir", "c"], ["--cache-dir", "c"]),
    (["--log_every", "2"], ["--log-every", "2"]),
    (["--eval_samples", "9"], ["--eval-samples", "9"]),
    (["--data_free"], ["--data-free"]),
    (["--random_fraction", "0.1"], ["--random-fraction", "0.1"]),
    (["--resume_from_checkpoint", "latest"], ["--resume-from-checkpoint", "latest"]),
    (["--report_to", "tensorboard"], ["--report-to", "tensorboard"]),
]


@pytest.mark.parametrize("diffusers_style, dashed", DIFFUSERS_SPELLINGS)
def test_every_option_takes_the_diffusers_spelling_too(diffusers_style, dashed):
    from genunlearn.cli import forget_parser, job_from_args

    def job(flags):
        args = forget_parser().parse_args(["--model", "cnn-digits", *([] if any(f.startswith("--random") for f in flags) else ["--class", "3"]), *flags])
        return job_from_args(args, dict(args.settings))

    one, other = job(diffusers_style), job(dashed)
    assert one == other and one != job([])


def test_report_to_tensorboard_writes_the_figures_the_run_logged(cnn_task, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "tracked"
    assert forget("--class", "3", "--method", "random_label", "--max_train_steps", "20", "--log_every", "5",
                  "--report_to", "tensorboard", "--output_dir", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    events = event_accumulator.EventAccumulator(str(out / "logs" / "genunlearn"))
    events.Reload()
    logged = [key for key in report["log"][0] if key != "step"]
    assert logged and set(logged) <= set(events.Tags()["scalars"])
    for key in logged:
        written = [(event.step, event.value) for event in events.Scalars(key)]
        assert written == [(entry["step"], pytest.approx(entry[key], rel=1e-6)) for entry in report["log"]], key
    for when, step in (("before", 0), ("after", 20)):
        written = events.Scalars(f"{when}/forget_acc")
        assert [(e.step, e.value) for e in written] == [(step, pytest.approx(report[when]["forget_acc"], rel=1e-6))]


def test_a_tracker_that_is_not_installed_is_named_with_its_install_line(monkeypatch, tmp_path, capsys):
    import genunlearn.runs.tracking as tracking

    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])
    assert forget("--class", "3", "--report_to", "tensorboard", "--output_dir", str(tmp_path / "out")) == 2
    assert "pip install 'genunlearn[tensorboard]'" in _one_error_line(capsys) and not (tmp_path / "out").exists()
    assert forget("--class", "3", "--report_to", "all", "--output_dir", str(tmp_path / "out")) == 2
    assert "found no tracker installed" in _one_error_line(capsys)


def test_resume_from_a_named_checkpoint_and_keep_a_number_of_them(cnn_task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--class", "3", "--method", "random_label", "--steps", "40", "--checkpointing_steps", "10",
              "--checkpoints_total_limit", "3"]
    assert forget(*common, "--output-dir", str(tmp_path / "straight")) == 0
    real_step = random_label.random_label_step
    monkeypatch.setattr(random_label, "random_label_step", interrupted_at(real_step, 35))
    assert forget(*common, "--output-dir", str(out)) == 130
    monkeypatch.setattr(random_label, "random_label_step", real_step)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]  # the newest 3, not the default 2
    newest = out / "checkpoints" / "checkpoint-30" / "model.safetensors"
    newest.write_bytes(b"")  # only an explicit older checkpoint can resume now without falling back
    capsys.readouterr()
    assert forget(*common, "--output-dir", str(out), "--resume_from_checkpoint", str(newest.parent)) == 2
    assert "is unreadable" in _one_error_line(capsys)
    assert forget(*common, "--output-dir", str(out), "--resume_from_checkpoint", str(tmp_path)) == 2
    assert "is not one of" in _one_error_line(capsys)
    assert forget(*common, "--output-dir", str(out), "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-10")) == 0
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    report = json.loads((out / "report.json").read_text())
    assert [entry["step"] for entry in report["log"]] == [10, 20, 30, 40]


def test_version_unknown_commands_and_a_methods_settings(capsys):
    from genunlearn import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"genunlearn {__version__}"
    assert main(["forgt"]) == 2
    assert "error: unknown command 'forgt'; choose one of forget, sweep" in capsys.readouterr().err
    assert main(["methods", "sfron", "--model", "ddpm-digits"]) == 0
    shown = capsys.readouterr().out
    assert "K1nght/Unified-Unlearning-w-Remain-Geometry" in shown  # the reference the defaults come from
    assert re.search(r"forget_objective\s+'adaga'\s+ddpm-digits: 'rl'", shown) and re.search(r"steps\s+1500\s+ddpm-digits: 50", shown)
    with pytest.raises(SystemExit):
        main(["forget", "--help"])
    assert capsys.readouterr().out.startswith("usage: genunlearn forget")


class StandInHub:
    """The Hugging Face Hub API as ``HfApi`` calls it, kept in a local folder: repos are folders, an upload copies the
    files the real client would send (its own ``filter_repo_objects`` over the ignore patterns)."""

    root: Path
    fail = False

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, exist_ok: bool = False, repo_type: str = "model"):
        if self.fail:  # the client raises an OSError subclass for a refused token or an unreachable host
            raise ConnectionError("401 Client Error: Unauthorized")
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id: str, folder_path: str, repo_type: str, ignore_patterns, commit_message: str) -> None:
        import shutil

        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            (self.root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, self.root / repo_id / name)


def test_push_to_hub_uploads_the_finished_run_to_a_stand_in_hub(cnn_task, tmp_path, monkeypatch, capsys):
    """``--push_to_hub --hub_model_id`` (diffusers' spelling) uploads the model card, weights and reports, never the
    checkpoints; the card's metadata reads back with huggingface_hub. A refused push is one error line, the run kept."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    StandInHub.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHub)
    out = tmp_path / "run"
    assert forget("--class", "3", "--method", "finetune", "--steps", "4", "--checkpoint-every", "2",
                  "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "me/cnn-without-3") == 0
    assert "pushed" in capsys.readouterr().out
    repo = StandInHub.root / "me" / "cnn-without-3"
    uploaded = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert {"README.md", "report.json", "report.md", "model/model.safetensors", "model/config.json"} <= set(uploaded)
    assert not any(name.startswith("checkpoints/") or name == "run.log" for name in uploaded)
    assert ModelCard.load(repo / "README.md").data.library_name == "timm"
    StandInHub.fail = True
    out2 = tmp_path / "run2"
    assert forget("--class", "3", "--method", "finetune", "--steps", "4", "--output-dir", str(out2), "--push-to-hub") == 2
    assert "error: could not push" in capsys.readouterr().err and (out2 / "report.json").is_file()
