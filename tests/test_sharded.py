"""The engine sharded (FSDP2 through ``accelerate launch --use_fsdp --fsdp_version 2``, 2 gloo processes on the CPU)
against one process and against DDP, on a tiny UNet and a tiny DiT trained one epoch on the digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genunlearn import SplitSpec, load_task, make_forget_split, unlearn
from genunlearn.cli import forget_main, guarded
from genunlearn.engine.selection import top_k_entries
from genunlearn.methods.registry import sharded_methods
from genunlearn.errors import UserError
from genunlearn.models.presets import DiffusionPreset
from helpers import accelerate_command
from test_diffusion import tiny_digits_preset

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).parent / "workers"
PRESETS = {"unet": "ddpm-digits", "dit": "dit-digits"}
CLASSIFIER_METHODS = ("lfssd", "ssd")  # the methods that shard and apply to classifiers only
VARIANTS = {"sfron+lookahead": {"lookahead": 0.5}, "sfron+joint": {"joint": True}}  # SFR-on's slow-weight pull, joint ablation
SHARDED_METHODS = sharded_methods()
CASES = [(model, method) for model in PRESETS for method in SHARDED_METHODS if method not in CLASSIFIER_METHODS] + \
        [("dit", variant) for variant in VARIANTS] + [("cnn", method) for method in CLASSIFIER_METHODS]
LAUNCHES = {"one": ["--num_processes", "1"], "ddp": ["--multi_gpu", "--num_processes", "2"],
            "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2"]}
GLOBAL_BATCH = 16
FEW_FISHER_BATCHES = {"sfron": {"fisher_batches": 6}}  # SFR-on's Fishers over 6 global batches, not a pass over D_r


def two_steps(method: str) -> dict:
    """Settings for 2 iterations (retrain's and SalUn's length is otherwise in epochs); SSD's alpha inside (1, 1/share)."""
    if method in CLASSIFIER_METHODS:
        return {"alpha": 5.0}
    return {"steps": 2, **({"epochs": None} if method in ("retrain", "salun") else {}), **VARIANTS.get(method, {})}


def tiny_dit_preset() -> DiffusionPreset:
    return DiffusionPreset.from_dict({
        "name": "tiny-dit", "architecture": "dit", "description": "test", "beta_schedule": "squaredcos_cap_v2",
        "model_args": {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 1, "out_channels": 1,
                       "num_layers": 2, "sample_size": 8, "patch_size": 2},
        "class_dropout": 0.1, "train": {"epochs": 1, "batch_size": 128, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.0},
        "sampling": {"steps": 4, "guidance": 1.0},
    })


@pytest.fixture(scope="module")
def pipelines(accelerator, tmp_path_factory) -> dict[str, Path]:
    """A tiny DDPM UNet and a tiny DiT, each trained one epoch on the digits and saved as a pipeline folder."""
    from genunlearn.data.digits import load_digits_split
    from genunlearn.models.diffusion_loading import load_diffusion_task
    from genunlearn.models.sampling import pipeline_for
    from genunlearn.storage.pipeline_folder import save_pipeline

    root = tmp_path_factory.mktemp("sharded-pipelines")
    train, test = load_digits_split()
    for name, preset in (("unet", tiny_digits_preset()), ("dit", tiny_dit_preset())):
        task = load_diffusion_task(preset, train, test, "digits8", pretrained=None, cache_root=root / f"cache-{name}",
                                   accelerator=accelerator)
        save_pipeline(pipeline_for(task), root / name)
    return {name: root / name for name in PRESETS}


def launch(script: Path, args: list[str], cache_dir: Path, how: str, port: int) -> subprocess.CompletedProcess:
    command = accelerate_command(script, args, processes=1, port=port)
    at = command.index("--num_processes")
    command[at:at + 2] = LAUNCHES[how]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GENUNLEARN_CACHE": str(cache_dir)})


def run_jobs(jobs: list[dict], cache_dir: Path, how: str, port: int) -> dict[str, dict[str, torch.Tensor]]:
    done = launch(WORKERS / "sharded_dump.py", [json.dumps(jobs)], cache_dir, how, port)
    assert done.returncode == 0, done.stderr[-3000:]
    return {Path(job["out"]).stem: load_file(job["out"]) for job in jobs}


def job(pipelines: dict, model: str, method: str, out: Path, **extra) -> dict:
    """A worker job; the classifier (cnn-digits, trained and cached by the ``cnn_task`` fixture) keeps SSD's global batch."""
    name, method = method, method.split("+")[0]  # a variant (VARIANTS) runs its method
    if model == "cnn":
        return {"preset": "cnn-digits", "method": method, "out": str(out / f"{model}-{name}.safetensors"), **extra}
    return {"pipeline": str(pipelines[model]), "preset": PRESETS[model], "method": method, "global_batch": GLOBAL_BATCH,
            "out": str(out / f"{model}-{name}.safetensors"), **extra}


def weights(dump: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in dump.items() if k.startswith("weights.")}


def original(pipeline: Path) -> dict[str, torch.Tensor]:
    """A pipeline folder's denoiser weights, named as in a dump."""
    return {f"weights.{k}": v for k, v in load_file(str(pipeline / "denoiser" / "diffusion_pytorch_model.safetensors")).items()}


def test_sharded_masks_equal_one_process_bit_for_bit_and_weights_match_ddp(pipelines, cache_dir, tmp_path):
    """SFR-on's Fisher-ratio mask (shard-local) and SalUn's global top half (an exact selection over the shards) of a
    2-process sharded run equal one process's over the same global batches, bit for bit; the weights after 3
    iterations match the DDP run's within float tolerance."""
    dumps = {}
    for how, port in (("one", 29561), ("ddp", 29563), ("fsdp", 29565)):
        out = tmp_path / how
        out.mkdir()
        jobs = [job(pipelines, model, method, out, masks=True, settings={"steps": 3, **FEW_FISHER_BATCHES.get(method, {})})
                for model in PRESETS for method in ("sfron", "salun")]
        dumps[how] = run_jobs(jobs, cache_dir, how, port)
    for name, one in dumps["one"].items():
        sharded, ddp = dumps["fsdp"][name], dumps["ddp"][name]
        masks = [k for k in one if k.startswith("mask.")]
        assert masks and all(torch.equal(sharded[k], one[k]) for k in masks), name
        kept = sum(int(one[k].sum()) for k in masks) / sum(one[k].numel() for k in masks)
        assert 0.0 < kept < 1.0, name  # the masks select
        assert int(sharded["sharded_over"]) == 2 and int(ddp["sharded_over"]) == 0
        start = original(pipelines[name.split("-")[0]])
        assert max(float((value - start[k]).abs().max()) for k, value in weights(sharded).items()) > 1e-5, name  # it trained
        for k, value in weights(ddp).items():
            # Adam's first steps move every weight by about lr (1e-4 to 2e-4): float32 sums in another order differ
            # by a few 1e-6 (seen: 7e-6 on the DiT's SFR-on)
            assert torch.allclose(sharded[k], value, rtol=0, atol=2e-5), (name, k)


@pytest.fixture(scope="module")
def two_iterations(pipelines, cnn_task, cache_dir, tmp_path_factory) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Every method that shards, 2 iterations on each tiny model (SSD: one dampening of cnn-digits), in one DDP and
    one sharded launch."""
    dumps = {}
    for how, port in (("ddp", 29581), ("fsdp", 29567)):
        out = tmp_path_factory.mktemp(f"two-iterations-{how}")
        jobs = [job(pipelines, model, method, out, settings=two_steps(method)) for model, method in CASES]
        dumps[how] = run_jobs(jobs, cache_dir, how, port)
    return dumps


@pytest.mark.parametrize("model, method", CASES)
def test_every_gradient_method_runs_two_iterations_sharded(method, model, two_iterations, pipelines, cnn_task):
    """Sharded over 2 processes, each method's 2 iterations end where DDP's do (float tolerance: retrain's fresh
    weights under AdamW 2e-3 differ from one process's by up to 4e-4, DDP's and the sharded run's alike, as the
    batch is split the same way); SFR-on's lookahead and joint ablation too; SSD's importances shard, and its dampening
    is element-wise on the shards."""
    ddp, sharded = (two_iterations[how][f"{model}-{method}"] for how in ("ddp", "fsdp"))
    assert int(sharded["sharded_over"]) == 2
    start = ({f"weights.{k}": v for k, v in cnn_task.model.state_dict().items()} if model == "cnn"
             else original(pipelines[model]))
    assert any(not torch.equal(value, start[k]) for k, value in weights(sharded).items())  # it trained
    bad = {k: float((value - ddp[k]).abs().max()) for k, value in weights(sharded).items()
           if not torch.allclose(value, ddp[k], rtol=1e-5, atol=2e-5)}
    assert not bad, bad


def test_a_killed_sharded_run_resumes_to_the_same_weights(pipelines, cache_dir, accelerator, tmp_path):
    """A sharded launch killed (every process exits hard) right after its step-2 checkpoint, resumed by a sharded launch,
    ends with the weights of an uninterrupted one, bit for bit; an unsharded run refuses its checkpoint."""
    settings = {"steps": 4, "checkpoint_every": 2, **FEW_FISHER_BATCHES["sfron"]}
    straight = run_jobs([job(pipelines, "dit", "sfron", tmp_path, settings=settings, checkpoint_dir=str(tmp_path / "a"))],
                        cache_dir, "fsdp", 29569)
    resumed_job = job(pipelines, "dit", "sfron", tmp_path / "b", settings=settings, checkpoint_dir=str(tmp_path / "b"))
    (tmp_path / "b").mkdir()
    killed = launch(WORKERS / "sharded_dump.py", [json.dumps([{**resumed_job, "exit_after_checkpoint": True}])], cache_dir,
                    "fsdp", 29571)
    assert killed.returncode != 0 and not Path(resumed_job["out"]).exists()
    shards = sorted(p.name for p in (tmp_path / "b" / "checkpoint-2").iterdir())
    assert shards == ["loop_state.json", "model-shard-00000-of-00002.safetensors", "model-shard-00001-of-00002.safetensors",
                      "optimizer-shard-00000-of-00002.safetensors", "optimizer-shard-00001-of-00002.safetensors",
                      "optimizer_settings.json"]
    resumed = run_jobs([{**resumed_job, "resume": True}], cache_dir, "fsdp", 29573)
    a, b = weights(straight["dit-sfron"]), weights(resumed["dit-sfron"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    task = load_task("dit-digits", pretrained=str(pipelines["dit"]), accelerator=accelerator)
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
    with pytest.raises(UserError, match="was written by 2 sharded processes; resume it with accelerate launch --use_fsdp "
                                        "--fsdp_version 2 --num_processes 2"):
        unlearn(task, split, "sfron", accelerator=accelerator, checkpoint_dir=tmp_path / "b", resume=True, **settings)


def test_the_sharded_selection_equals_the_whole_one_with_ties_and_empty_shards(cache_dir, tmp_path):
    """``top_k_entries`` over 2 processes' dim-0 shards of scores with four values (ties at every cut), one parameter
    wholly on the first process, picks what the whole-tensor selection picks, for k from 0 to all."""
    out = tmp_path / "selection.safetensors"
    done = launch(WORKERS / "selection_shards.py", [str(out)], cache_dir, "ddp", 29577)
    assert done.returncode == 0, done.stderr[-3000:]
    picked = load_file(str(out))
    pairs = [k.removeprefix("whole.") for k in picked if k.startswith("whole.")]
    assert len(pairs) == 30 and all(torch.equal(picked[f"sharded.{p}"], picked[f"whole.{p}"]) for p in pairs)


def test_the_selection_takes_exactly_k_the_larger_first_and_ties_in_order():
    generator = torch.Generator().manual_seed(1)
    scores = [torch.randint(0, 3, (6, 2), generator=generator).float(), torch.randint(0, 3, (5,), generator=generator).float()]
    flat = torch.cat([s.flatten() for s in scores])
    for k in range(flat.numel() + 1):
        chosen = torch.cat([m.flatten() for m in top_k_entries(scores, k)])
        assert int(chosen.sum()) == k
        if 0 < k:
            cut = flat.sort(descending=True).values[k - 1]
            assert bool(chosen[flat > cut].all()) and not bool(chosen[flat < cut].any())
            ties = (flat == cut).nonzero().flatten()
            taken = chosen[ties]
            assert bool((taken[:-1].int() >= taken[1:].int()).all())  # ties taken first come, first served


def test_fsdp_with_a_method_that_cannot_shard_and_8bit_adam_on_a_cpu_are_refused_in_one_line(cnn_task, monkeypatch,
                                                                                               tmp_path, capsys):
    base = ["--model", "cnn-digits", "--class", "3", "--output-dir", str(tmp_path / "run")]
    assert guarded(forget_main, [*base, "--set", "optimizer=adamw8bit"]) == 2
    assert capsys.readouterr().err.strip().endswith("8-bit AdamW (bitsandbytes) runs on CUDA GPUs only; use "
                                                    "optimizer=adamw on this machine")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert guarded(forget_main, [*base, "--method", "fast_ntk"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: fast_ntk does not run sharded (FSDP); launch it without --use_fsdp "
                     f"(configs/accelerate/multi_gpu.yaml), or use one of {', '.join(SHARDED_METHODS)}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("version, precision, message", [
    ("1", "no", "FSDP version 1 is not supported; launch with --fsdp_version 2"),
    ("2", "fp16", "sharded runs compute in fp32 or bf16; pass --mixed-precision bf16 instead of fp16"),
])
def test_fsdp_version_1_and_fp16_are_refused(version, precision, message, monkeypatch):
    from types import SimpleNamespace

    from genunlearn.engine.sharding import fsdp_requested

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    launch_settings = SimpleNamespace(state=SimpleNamespace(), mixed_precision=precision, num_processes=2)
    with pytest.raises(UserError, match=message):
        fsdp_requested(launch_settings)


def test_the_fsdp_recipe_runs_the_script_and_its_output_loads_with_diffusers_alone(pipelines, cnn_task, cache_dir, tmp_path):
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (2 processes here) runs forget_class.py sharded,
    with gradient checkpointing and the original offloaded: the report says so and the pipeline folder's denoiser loads
    with diffusers alone, holding the unlearned weights."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
               "--num_processes", "2", "--main_process_port", "29579", str(REPO / "scripts" / "forget_class.py"),
               "--model", "ddpm-digits", "--pretrained", str(pipelines["unet"]), "--class", "3", "--steps", "2",
               "--eval-samples", "4", "--eval-steps", "2", "--gradient-checkpointing", "--set", "offload_frozen=true",
               "--output-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GENUNLEARN_CACHE": str(cache_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    assert report["method_info"]["sharded_over"] == 2 and report["method_info"]["evaluated_on"] == "gathered copy"
    assert report["memory"] == {"sharding": "fsdp2", "gradient_checkpointing": True, "offload_frozen": True}
    script = f"""
import sys
from diffusers import UNet2DModel
from safetensors.torch import load_file
unet = UNet2DModel.from_pretrained({str(out / "pipeline" / "denoiser")!r})
before = load_file({str(pipelines["unet"] / "denoiser" / "diffusion_pytorch_model.safetensors")!r})
moved = max(float((p.detach() - before[n]).abs().max()) for n, p in unet.named_parameters())
assert 0 < moved < 1, moved
assert "genunlearn" not in sys.modules
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-2000:]


def test_ssd_alpha_auto_is_refused_sharded(cnn_task, class3_split, monkeypatch):
    """SSD shards with a given alpha; its alpha search (dampened copies scored on held-out forget data) does not."""
    from types import SimpleNamespace

    from genunlearn.methods.ssd import SSDConfig, run_ssd

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    two_processes = SimpleNamespace(state=SimpleNamespace(), mixed_precision="no", num_processes=2, is_main_process=True)
    with pytest.raises(UserError, match="ssd alpha=auto does not run sharded"):
        run_ssd(cnn_task, class3_split, SSDConfig(alpha="auto"), two_processes, label_free=False)


def test_gradient_checkpointing_on_a_model_without_it_is_refused_in_one_line(cnn_task, tmp_path, capsys):
    """diffusers and timm models switch it on through their library; our SmallCNN has none."""
    argv = ["--model", "cnn-digits", "--class", "3", "--steps", "1", "--gradient-checkpointing", "--output-dir", str(tmp_path / "run")]
    assert guarded(forget_main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: SmallCNN has no gradient checkpointing (diffusers and "
                                                                "timm models have it); run without --gradient-checkpointing")
