"""Speed and memory of the engine on real-size architectures with random weights (the architecture is the experiment,
not the weights), each method against a plain fine-tuning step in the same run.

    python benchmarks/scale.py --tiny          # scaled-down DiT on the CPU (minutes): checks the script end to end
    python benchmarks/scale.py                 # DiT-XL/2 256 at batch 32 per process, on the GPU (bf16 autocast)

Each cell runs ``genunlearn.unlearn`` on a DiT task over random latents (4x32x32, 1000 classes) for ``--steps``
iterations and records iterations per second of the loop (masks and Fishers timed apart, from the method's info), the
ratio to fine-tuning's, and peak GPU memory; one JSON per run in results/scale/. This version measures the data
parallel engine on DiT-XL/2; the SD-1.5 and SD-XL UNets and the sharded engine are the next cells (issue 34).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from genunlearn.storage.files import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale"
DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
              patch_size=2, num_embeds_ada_norm=1000)
TINY = {**DIT_XL, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2}
METHODS = ("finetune", "sfron", "salun")
DIT_FORWARD_GFLOP = 118.6  # DiT-XL/2 256 per image (Peebles & Xie, table 4)


def dit_task(config: dict, samples: int, seed: int):
    """A DiT task over ``samples`` random latents of 10 classes (of its 1000), with the DiT reference's settings."""
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from torch.utils.data import TensorDataset

    import genunlearn as gu

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**config)
    latents = torch.randn(samples, 4, config["sample_size"], config["sample_size"], generator=generator)
    labels = torch.arange(samples) % 10
    data = TensorDataset(latents, labels)
    data.latents = True  # already in the denoiser's space: no VAE
    return gu.diffusion_task(model, data, data, scheduler=DDPMScheduler(beta_schedule="linear"),
                             classes=[str(c) for c in range(1000)])


def run_cell(task, method: str, steps: int, batch_size: int, precision: str) -> dict:
    """One method's timed run: loop iterations per second, mask time, peak GPU memory (GB, None on CPU)."""
    import torch

    import genunlearn as gu
    from genunlearn.distributed import make_accelerator

    accelerator = make_accelerator(mixed_precision=precision)
    split = gu.forget_split(task, classes=[0])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = gu.unlearn(task, split, method, accelerator=accelerator, steps=steps, batch_size=batch_size, log_every=steps)
    total = time.perf_counter() - started
    return {"method": method, "steps": result.steps, "loop_s": result.wall_time_s, "it_per_s": result.steps / result.wall_time_s,
            "mask_s": result.info.get("mask_time_s"), "total_s": total,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}


def render(cell: dict) -> str:
    base = next(r for r in cell["rows"] if r["method"] == "finetune")["it_per_s"]
    lines = [f"{cell['model']} on {cell['device']}, batch {cell['batch_size']}, {cell['precision']}, {cell['steps']} iterations "
             "per method, random weights and latents:", "",
             "| method | it/s | x fine-tune step time | mask/Fisher s | peak GPU GB |", "|---|---|---|---|---|"]
    for row in cell["rows"]:
        mask = "" if row["mask_s"] is None else f"{row['mask_s']:.1f}"
        peak = "n/a" if row["peak_gpu_gb"] is None else f"{row['peak_gpu_gb']:.1f}"
        lines.append(f"| {row['method']} | {row['it_per_s']:.2f} | {base / row['it_per_s']:.2f} | {mask} | {peak} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer DiT at batch 4 on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=20, help="iterations per method (default 20)")
    args = parser.parse_args()
    import torch

    config, batch, precision = (TINY, 4, "no") if args.tiny else (DIT_XL, 32, "bf16")
    steps = args.steps
    task = dit_task(config, samples=4 * batch, seed=0)
    rows = [run_cell(task, method, steps, batch, precision) for method in METHODS]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    cell = {"model": "DiT-XL/2 256" + (" (tiny: 2 layers, width 32)" if args.tiny else ""), "device": device,
            "batch_size": batch, "precision": precision, "steps": steps, "torch": torch.__version__,
            "python": platform.python_version(), "rows": rows}
    print(render(cell))
    path = RESULTS / f"dit{'-tiny' if args.tiny else ''}__{device.split(' (')[0].replace(' ', '-')}.json"
    atomic_write_text(path, json.dumps(cell, indent=2) + "\n")  # a killed run leaves the previous cell
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
