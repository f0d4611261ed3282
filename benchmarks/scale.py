"""Speed and memory of the engine on real-size architectures with random weights (the architecture is the experiment,
not the weights), each method against a plain fine-tuning step in the same run.

    python benchmarks/scale.py --tiny          # scaled-down models on the CPU (a minute): checks the script end to end
    python benchmarks/scale.py                 # DiT-XL/2 256 (batch 32), the SD-1.5 UNet (64x64 latents, batch 8) and
                                               # the SD-XL UNet (128x128 latents, batch 2; add --gradient-checkpointing)
                                               # and the SD3-medium MMDiT (16x128x128 latents, batch 2)
    accelerate launch --config_file configs/accelerate/fsdp.yaml benchmarks/scale.py   # the same, sharded (FSDP2)
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 benchmarks/scale.py --tiny   # sharded on a CPU

Each cell runs ``genunlearn.unlearn`` for ``--steps`` iterations per method: on a DiT task over random latents
(4x32x32, 1000 classes; fine-tune, SFR-on, SalUn) and on a text-to-image task of the SD-1.5 UNet over random latents
(4x64x64) and 8 prompts through a 768-wide one-layer CLIP text encoder (fine-tune, SFR-on, SalUn, ESD), and the same
on the SD-XL UNet (4x128x128 latents; two one-layer text encoders of SD-XL's widths, pooled embeddings and time ids)
and on SD3-medium's transformer (16x128x128 latents, flow matching; one-layer CLIP-L, CLIP-G and T5-XXL encoders, T5's
256 tokens). It records
iterations per second of the loop (masks and Fishers timed apart, from the method's info), the ratio to fine-tuning's,
peak GPU memory of the main process, the precision and the sharding (none, DDP or FSDP2 over N processes, as
launched); one JSON per model and launch in results/scale/, written by the main process. Batches are per process.
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
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, layers_per_block=2)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12)
SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
                 layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_time_embed_dim=256)
SDXL_TEXT = (SD15_TEXT, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_attention_heads=20,
                             projection_dim=1280))  # CLIP ViT-L and OpenCLIP bigG widths, one layer each
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)  # SD3-medium
SD3_TEXT = ({**SD15_TEXT, "projection_dim": 768}, SDXL_TEXT[1],
            dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64, dropout_rate=0.0))  # CLIP-L, bigG, T5-XXL
PROMPTS = [f"a photo of thing {n}" for n in range(8)]  # the forget split takes prompt 0
MODELS = {  # name: (label, full config, tiny config, methods, batch, tiny batch)
    "dit-xl": ("DiT-XL/2 256", DIT_XL, {**DIT_XL, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2},
               ("finetune", "sfron", "salun"), 32, 4),
    "sd-1.5": ("SD-1.5 UNet", SD15_UNET, {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64),
                                           "norm_num_groups": 8}, ("finetune", "sfron", "salun", "esd"), 8, 2),
    "sd-xl": ("SD-XL UNet", SDXL_UNET, {**SDXL_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64),
                                         "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 4, 4),
                                         "norm_num_groups": 8, "addition_time_embed_dim": 8},
              ("finetune", "sfron", "salun", "esd"), 2, 2),
    "sd3": ("SD3-medium MMDiT", SD3_TRANSFORMER, {**SD3_TRANSFORMER, "sample_size": 8, "num_layers": 2, "attention_head_dim": 16,
                                                 "num_attention_heads": 2, "caption_projection_dim": 32, "pos_embed_max_size": 8},
            ("finetune", "sfron", "salun", "esd"), 2, 2),
}
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


def prompt_task(model: str, config: dict, samples: int, seed: int, tiny: bool):
    """A text-to-image task of an SD-1.5 or SD-XL UNet or SD3's transformer (``model``, ``config``) over ``samples``
    random latents of ``PROMPTS``, conditioned by one-layer text encoders of the model's widths (77 CLIP tokens, 256 T5
    tokens; scaled down with ``tiny``), with the sd-1.5 preset's method settings."""
    import torch
    from diffusers import DDPMScheduler

    from genunlearn.data.tensor_dataset import LabeledTensorDataset
    from genunlearn.models.presets import get_preset
    from genunlearn.models.tiny_sd import TINY_SD, build_tiny_sd, build_tiny_sdxl
    from genunlearn.models.tiny_sd3 import TINY_SD3, build_tiny_sd3
    from genunlearn.tasks.text_to_image_pipelines import text_to_image_task

    words = sorted({word for prompt in PROMPTS for word in prompt.split()})
    if model == "sd-1.5":
        text = {**SD15_TEXT, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64} if tiny else SD15_TEXT
        pipeline = build_tiny_sd(words, text_encoder=text, unet=config, vae=TINY_SD["vae"], max_length=77, seed=seed)
    elif model == "sd3":
        first, second, third = SD3_TEXT
        if tiny:
            first, second, third = TINY_SD3["text_encoder"], TINY_SD3["text_encoder_2"], TINY_SD3["text_encoder_3"]
        pipeline = build_tiny_sd3(words, text_encoder=first, text_encoder_2=second, text_encoder_3=third, transformer=config,
                                  vae=TINY_SD["vae"], max_length=77, seed=seed)
    else:
        first, second = SDXL_TEXT
        if tiny:
            first = {**first, "num_attention_heads": 2, "hidden_size": 16, "intermediate_size": 32}
            second = {**second, "num_attention_heads": 2, "hidden_size": 24, "intermediate_size": 48, "projection_dim": 16}
        pipeline = build_tiny_sdxl(words, text_encoder=first, text_encoder_2=second, unet=config, vae=TINY_SD["vae"],
                                   max_length=77, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(samples, config.get("in_channels", 4), config["sample_size"], config["sample_size"], generator=generator)
    data = LabeledTensorDataset(latents, torch.arange(samples) % len(PROMPTS), PROMPTS)
    return text_to_image_task(pipeline, get_preset("sd-1.5"), DDPMScheduler(beta_schedule="scaled_linear"), data, data,
                              encoded_data=True)


def run_cell(task, method: str, steps: int, batch_size: int, accelerator) -> dict:
    """One method's timed run: loop iterations per second, mask time, peak GPU memory (GB, None on CPU)."""
    import torch

    import genunlearn as gu

    split = gu.forget_split(task, classes=[0])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = gu.unlearn(task, split, method, accelerator=accelerator, steps=steps, batch_size=batch_size, log_every=steps)
    total = time.perf_counter() - started
    return {"method": method, "steps": result.steps, "loop_s": result.wall_time_s, "it_per_s": result.steps / result.wall_time_s,
            "mask_s": result.info.get("mask_time_s"), "total_s": total,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}


def sharding(accelerator) -> str:
    """How the launch runs the engine: ``none``, ``DDP x N`` or ``FSDP2 x N``."""
    from genunlearn.engine.sharding import sharding_requested

    if accelerator.num_processes == 1:
        return "none"
    return f"{'FSDP2' if sharding_requested(accelerator) else 'DDP'} x {accelerator.num_processes}"


def render(cell: dict) -> str:
    base = next(r for r in cell["rows"] if r["method"] == "finetune")["it_per_s"]
    precision = {"no": "fp32"}.get(cell["precision"], cell["precision"])
    lines = [f"{cell['model']} on {cell['device']}, batch {cell['batch_size']} per process, {precision}, sharding "
             f"{cell.get('sharding', 'none')}{', gradient checkpointing' if cell.get('gradient_checkpointing') else ''}, "
             f"{cell['steps']} iterations per method, random weights and latents:", "",
             "| method | it/s | x fine-tune step time | mask/Fisher s | peak GPU GB |", "|---|---|---|---|---|"]
    for row in cell["rows"]:
        mask = "" if row["mask_s"] is None else f"{row['mask_s']:.1f}"
        peak = "n/a" if row["peak_gpu_gb"] is None else f"{row['peak_gpu_gb']:.1f}"
        lines.append(f"| {row['method']} | {row['it_per_s']:.2f} | {base / row['it_per_s']:.2f} | {mask} | {peak} |")
    return "\n".join(lines)


def cell_name(model: str, tiny: bool, device: str, launch: str, checkpointing: bool) -> str:
    """The result file's stem: ``dit-tiny__cpu``, ``sd-1.5__NVIDIA-H100-80GB-HBM3__fsdp2x8``, ..."""
    stem = {"dit-xl": "dit", "sd-1.5": "sd15", "sd-xl": "sdxl", "sd3": "sd3"}[model] + ("-tiny" if tiny else "")
    parts = [stem, device.split(" (")[0].replace(" ", "-")]
    if launch != "none":
        parts.append(launch.replace(" x ", "x").lower())
    if checkpointing:
        parts.append("ckpt")
    return "__".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="scaled-down models (2-layer DiT, 4-level UNet of width 32) on the "
                                                             "CPU in fp32 (checks the script)")
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS), help="architectures (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="iterations per method (default 20)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    args = parser.parse_args()
    import torch

    from genunlearn.distributed import make_accelerator
    from genunlearn.methods.registry import sharded_methods

    accelerator = make_accelerator(mixed_precision="no" if args.tiny else "bf16")
    launch = sharding(accelerator)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    for model in args.model:
        label, full, tiny, methods, batch, tiny_batch = MODELS[model]
        config, batch = (tiny, tiny_batch) if args.tiny else (full, batch)
        samples = 4 * batch * accelerator.num_processes
        task = dit_task(config, samples, seed=0) if model == "dit-xl" else prompt_task(model, config, samples, 0, args.tiny)
        if args.gradient_checkpointing:
            task.model.enable_gradient_checkpointing()
        runnable = [m for m in methods if m in sharded_methods() or not launch.startswith("FSDP")]  # ESD does not shard
        rows = [run_cell(task, method, args.steps, batch, accelerator) for method in runnable]
        cell = {"model": label + (" (tiny)" if args.tiny else ""), "config": {k: list(v) if isinstance(v, tuple) else v
                                                                               for k, v in config.items()},
                "device": device, "batch_size": batch, "precision": str(accelerator.mixed_precision), "sharding": launch,
                "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps, "torch": torch.__version__,
                "python": platform.python_version(), "rows": rows}
        if accelerator.is_main_process:
            print(render(cell))
            path = RESULTS / f"{cell_name(model, args.tiny, device, launch, args.gradient_checkpointing)}.json"
            atomic_write_text(path, json.dumps(cell, indent=2) + "\n")  # a killed run leaves the previous cell
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
