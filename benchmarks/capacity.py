"""Capacity on paper: the bytes of state each method holds for real-size architectures, whole and per GPU under
N-way sharding, and which fit on 1 x 80 GB and 8 x 80 GB. Activations are not counted (they depend on batch, resolution
and gradient checkpointing; benchmarks/scale.py is to measure peaks against these figures).

    python benchmarks/capacity.py        # prints the table, writes results/capacity/capacity.json

Parameters are counted exactly: each architecture is built on PyTorch's meta device from its diffusers config (no
weights, no memory). State per parameter, as genunlearn's methods hold it:

- fp32: weights 4 B, gradients 4 B, Adam's two moments 8 B (mixed precision autocasts the compute, the state stays fp32);
- bf16: weights, gradients and Adam's moments in bf16 (esd_sd.py's setting): 2 + 2 + 4 B;
- SFR-on adds its two Fishers (F_f, F_r, 4 B each in fp32) while the mask is computed, and the mask (1 B);
- SalUn adds the saliency accumulator (4 B) and the mask (1 B);
- ESD adds the frozen teacher copy of the weights (4 B or 2 B).
All of it is per-parameter state, so N-way FSDP divides it by N (plus one gathered layer at a time, not counted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from genunlearn.storage.files import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "capacity"
GB = 1e9
GPU_GB = 80

ARCHITECTURES = {  # name: (diffusers class, config)
    "DiT-XL/2 256": ("DiTTransformer2DModel", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                                    num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
    "SD-1.5 UNet": ("UNet2DConditionModel", dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                                 attention_head_dim=8, layers_per_block=2)),
    "SD-XL UNet": ("UNet2DConditionModel", dict(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)),
    "FLUX.1-dev transformer": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                               attention_head_dim=128, num_attention_heads=24,
                                                               joint_attention_dim=4096, pooled_projection_dim=768,
                                                               guidance_embeds=True)),
}
BYTES = {  # precision: per-parameter bytes of each state component
    "fp32": {"weights": 4, "gradients": 4, "adam": 8, "fishers": 8, "saliency": 4, "mask": 1, "teacher": 4},
    "bf16": {"weights": 2, "gradients": 2, "adam": 4, "fishers": 4, "saliency": 2, "mask": 1, "teacher": 2},
}
METHODS = {  # method: the state it holds at its peak
    "finetune": ("weights", "gradients", "adam"),
    "sfron": ("weights", "gradients", "adam", "fishers", "mask"),
    "salun": ("weights", "gradients", "adam", "saliency", "mask"),
    "esd": ("weights", "gradients", "adam", "teacher"),
}


def parameter_count(class_name: str, config: dict) -> int:
    """The architecture's parameters, counted on the meta device (nothing allocated)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    return sum(p.numel() for p in model.parameters())


def capacity() -> dict:
    rows = []
    for name, (class_name, config) in ARCHITECTURES.items():
        count = parameter_count(class_name, config)
        for precision, per_param in BYTES.items():
            for method, parts in METHODS.items():
                total = count * sum(per_param[p] for p in parts) / GB
                rows.append({"architecture": name, "parameters": count, "precision": precision, "method": method,
                             "state_gb": total, "per_gpu_8way_gb": total / 8})
    return {"gpu_gb": GPU_GB, "rows": rows}


def render(result: dict) -> str:
    gpu = result["gpu_gb"]
    lines = ["| architecture | parameters | precision | method | state GB | per GPU, 8-way FSDP | fits 1 x 80 GB | fits 8 x 80 GB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['architecture']} | {row['parameters'] / 1e9:.3f} B | {row['precision']} | {row['method']} | "
                     f"{row['state_gb']:.1f} | {row['per_gpu_8way_gb']:.1f} | {'yes' if row['state_gb'] < gpu else 'no'} | "
                     f"{'yes' if row['per_gpu_8way_gb'] < gpu else 'no'} |")
    return "\n".join(lines)


def main() -> int:
    result = capacity()
    print(render(result))
    path = RESULTS / "capacity.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")  # a killed run leaves the previous cell
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
