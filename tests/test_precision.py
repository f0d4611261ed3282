"""The precision contract: explicit (fp32 unless asked, whatever the launcher's environment says), the same for the
model before and after, a plain fp32 module returned and saved, and recorded in the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
UNCHANGED = ["--method", "ssd", "--set", "alpha=1e30"]  # selects no weight: the model (buffers too) leaves unchanged


def forget(out: Path, cache_dir: Path, *flags: str, env: dict | None = None) -> dict:
    command = [sys.executable, "-m", "genunlearn", "forget", "--model", "cnn-digits", "--class", "3", *UNCHANGED, *flags,
               "--output-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "GENUNLEARN_CACHE": str(cache_dir), **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


def figures(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_time_s")}


def test_bf16_measures_before_and_after_alike_and_saves_a_plain_fp32_model(cache_dir, tmp_path):
    """With weights that did not move, "after" equals "before" in every figure only if both are measured at the same
    precision (the MIA's entropies see any difference); the saved weights are fp32."""
    report = forget(tmp_path / "bf16", cache_dir, "--mixed_precision", "bf16")
    assert report["environment"]["mixed_precision"] == "bf16" and report["environment"]["tf32"] is False
    assert report["method_info"]["selected"] == 0
    assert figures(report["after"]) == figures(report["before"])
    saved = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in saved.values() if tensor.is_floating_point())


def test_the_launchers_precision_applies_only_when_asked(cache_dir, tmp_path):
    launcher = {"ACCELERATE_MIXED_PRECISION": "bf16"}  # what `accelerate launch --mixed_precision bf16` exports
    assert forget(tmp_path / "default", cache_dir, env=launcher)["environment"]["mixed_precision"] == "no"
    assert forget(tmp_path / "auto", cache_dir, "--mixed_precision", "auto", env=launcher)["environment"]["mixed_precision"] == "bf16"


def test_the_loop_returns_a_plain_module_under_mixed_precision():
    """accelerate's ``prepare`` wraps forward in autocast; the model the loop returns has it removed, so it computes
    in fp32 wherever it goes next (a fresh process: accelerate fixes the precision once per process)."""
    script = """
import torch
from genunlearn.distributed import make_accelerator
from genunlearn.engine.loop import LoopConfig, run_loop
from genunlearn.data.tensor_dataset import LabeledTensorDataset

class Task:
    def training_loss(self, model, batch):
        return (model(batch[0]).squeeze(-1) - batch[1].float()).pow(2)

accelerator = make_accelerator(mixed_precision="bf16")
data = LabeledTensorDataset(torch.randn(8, 3), torch.arange(8) % 2, ["a", "b"])
def step(ctx):
    loss = ctx.task.training_loss(ctx.model, ctx.retain.next()).mean()
    ctx.backward_step(loss)
    return {"loss": loss.item()}
model = run_loop(torch.nn.Linear(3, 1), Task(), step, LoopConfig(steps=2, batch_size=4), accelerator, retain_data=data).model
assert "_original_forward" not in model.__dict__
assert model(torch.randn(2, 3)).dtype == torch.float32 and model.weight.dtype == torch.float32
print("plain")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "plain" in done.stdout, done.stderr[-2000:]


def test_an_unknown_precision_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "genunlearn", "forget", "--model", "cnn-digits", "--class", "3",
                           "--mixed-precision", "fp8", "--output-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "--mixed-precision" in done.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_set_and_read_back(enabled):
    from genunlearn.precision import set_tf32, tf32_enabled

    try:
        set_tf32(enabled)
        assert tf32_enabled() is enabled
    finally:
        set_tf32(False)
