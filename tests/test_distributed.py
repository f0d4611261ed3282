"""Two processes (accelerate launch --multi_gpu, gloo on CPU) against one, at the same effective batch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from genunlearn.cli import forget_main, guarded
from helpers import accelerate_launch

REPO = Path(__file__).resolve().parents[1]


def launch_two_processes(script_args: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    return accelerate_launch(REPO / "scripts" / "forget_class.py", script_args, cache_dir)


def test_two_processes_match_one(cnn_task, cache_dir, tmp_path):
    # SFR-on: the 2-process run also reads the Fishers that the 1-process run cached
    common = ["--model", "cnn-digits", "--class", "3", "--method", "sfron"]
    assert guarded(forget_main, [*common, "--batch-size", "64", "--output-dir", str(tmp_path / "one")]) == 0
    done = launch_two_processes([*common, "--batch-size", "32", "--output-dir", str(tmp_path / "two")], cache_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["README.md", "curves.png", "model", "report.json", "report.md", "run.json",
                                                                       "run.log"]
    assert two["method_info"]["mask_cached"] and two["method_info"]["mask_kept_fraction"] == one["method_info"]["mask_kept_fraction"]
    # Same global batches and mask; only BatchNorm's batch statistics (32 vs 64 per process) differ.
    for key in ("forget_acc", "forget_test_acc", "retain_acc", "test_acc"):
        assert two["after"][key] == pytest.approx(one["after"][key], abs=0.02), key
    before_one, before_two = ({k: v for k, v in r["before"].items() if k != "eval_time_s"} for r in (one, two))
    assert before_two.pop("per_class_acc") == pytest.approx(before_one.pop("per_class_acc"))
    assert before_two == pytest.approx(before_one)
    for a, b in zip(one["log"], two["log"]):
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=0.5, abs=0.02)
        assert b["forget_weight"] == pytest.approx(a["forget_weight"])


def test_cpu_threads_are_shared_between_local_processes(monkeypatch):
    """accelerate launch exports OMP_NUM_THREADS=1; a lone process still gets every core, two get half each."""
    from genunlearn.distributed import THREADS_ENV, use_cpu_threads

    cores = os.cpu_count() or 1
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        torch.set_num_threads(1)
        use_cpu_threads()
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        use_cpu_threads()
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv(THREADS_ENV, "1")
        use_cpu_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(cores)


def test_ssd_alpha_auto_finds_the_same_alpha_on_two_processes(cnn_task, cache_dir, tmp_path, capsys):
    """The bisection's held-out accuracies are gathered from every process, so both processes walk the same path: the
    same α and the same dampened model as one process. A warning prints once, as one ``warning:`` line."""
    common = ["--model", "cnn-digits", "--class", "3", "--method", "ssd"]
    assert guarded(forget_main, [*common, "--set", "alpha=auto", "--output-dir", str(tmp_path / "one")]) == 0
    done = launch_two_processes([*common, "--set", "alpha=auto", "--output-dir", str(tmp_path / "two")], cache_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert two["processes"] == 2 and two["method_info"]["alpha"] == one["method_info"]["alpha"]
    assert two["after"]["forget_acc"] == one["after"]["forget_acc"] <= 0.1
    capsys.readouterr()
    assert guarded(forget_main, [*common, "--set", "alpha=10", "--output-dir", str(tmp_path / "ten")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ssd alpha=10")]
    assert len(lines) == 1 and "pass alpha below 9.84, or alpha=auto" in lines[0]


@pytest.mark.parametrize("recipe, processes", [("cpu_gloo", 2), ("single", 1), ("multi_gpu", 2)])
def test_the_launch_recipes_in_configs_run_the_main_job(recipe, processes, cnn_task, cache_dir, tmp_path):
    """``accelerate launch --config_file configs/accelerate/RECIPE.yaml`` runs the forget script as the recipe says
    (multi_gpu with its process count lowered to 2: on this CPU machine it runs over gloo, as it would over NCCL)."""
    import sys

    override = ["--num_processes", "2"] if recipe == "multi_gpu" else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{recipe}.yaml"),
               *override, "--main_process_port", "29523", str(REPO / "scripts" / "forget_class.py"), "--model", "cnn-digits",
               "--class", "3", "--method", "finetune", "--steps", "2", "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GENUNLEARN_CACHE": str(cache_dir)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["processes"] == processes
