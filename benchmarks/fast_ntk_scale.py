"""Fast-NTK at scale: time and peak memory on the resnet18 BatchNorm scope (9,600 parameters), next to SSD.

Data: the digits upsampled to 32x32x3 (CIFAR size), repeated with small Gaussian noise up to N images, 10
classes, class 3 forgotten. Model: timm resnet18 with the CIFAR stem, a random backbone with BatchNorm running
statistics from one pass over the data (eval mode, as the NTK needs), scope = BatchNorm affine only. Each
(method, N) runs in its own process so its peak resident memory is its own.

    python benchmarks/fast_ntk_scale.py                    # N = 500, 1000, 2000, 5000
    python benchmarks/fast_ntk_scale.py --sizes 500 --output /tmp/ntk.json

Targets (issue #7): 5000 images in <= 10 minutes and <= 4 GB on 2 CPU cores. Prints a markdown table and writes
JSON (default outputs/benchmarks/fast_ntk_scale.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

TARGET_SECONDS, TARGET_GB, TARGET_SIZE = 600.0, 4.0, 5000


def synthetic_cifar(count: int, seed: int = 0):
    """``count`` 32x32x3 images in [-1, 1]: the digits upsampled, cycled, with N(0, 0.05²) noise; digit labels."""
    from genunlearn.data.digits import load_digits_split
    from genunlearn.data.tensor_dataset import LabeledTensorDataset

    digits, _ = load_digits_split(resolution=32)
    index = torch.arange(count) % len(digits)
    generator = torch.Generator().manual_seed(seed)
    images = digits.images[index].expand(-1, 3, -1, -1)
    images = (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    return LabeledTensorDataset(images, digits.targets[index], digits.classes)


def run_one(method: str, count: int) -> dict:
    """Build the model and data, run ``method`` once; wall time and this process's peak RSS."""
    from genunlearn.data.split import SplitSpec, make_forget_split
    from genunlearn.distributed import make_accelerator
    from genunlearn.methods.fast_ntk import FastNTKConfig, fast_ntk
    from genunlearn.methods.ssd import SSDConfig, ssd
    from genunlearn.models.presets import ClassifierPreset
    from genunlearn.tasks.classifier import ClassifierTask, build_classifier

    data = synthetic_cifar(count)
    preset = ClassifierPreset(name="resnet18-cifar-bn-bench", timm_name="resnet18", stem="cifar", peft="batchnorm",
                              dataset="synthetic", image_size=32, channels=3)
    model = build_classifier(preset, 10)
    with torch.no_grad():  # running statistics from the data, then eval mode
        model.train()
        for batch in data.images.split(256):
            model(batch)
    model.eval()
    task = ClassifierTask(preset, model, data, data, cache_dir=None)
    split = make_forget_split(data, data, SplitSpec("class", classes=(3,)))
    accelerator = make_accelerator()
    started = time.perf_counter()
    if method == "fast_ntk":
        result = fast_ntk(task, split, FastNTKConfig(scope="batchnorm", loss="ce"), accelerator)
        facts = {key: result.info[key] for key in ("form", "scope_parameters")}
        facts["jacobian_path"] = "batchnorm (K batched backward passes + per-sample channel reductions)"
    else:
        result = ssd(task, split, SSDConfig(alpha=10.0), accelerator)
        facts = {"selected_fraction": result.info.get("selected_fraction")}
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"method": method, "images": count, "forget": len(split.forget), "seconds": seconds, "peak_gb": peak_gb,
            "threads": torch.get_num_threads(), **facts}


def table(rows: list[dict]) -> str:
    lines = ["| method | N | form | seconds | peak GB | within target |", "|---|---|---|---|---|---|"]
    for row in rows:
        target = ""
        if row["method"] == "fast_ntk" and row["images"] == TARGET_SIZE:
            target = "yes" if row["seconds"] <= TARGET_SECONDS and row["peak_gb"] <= TARGET_GB else "NO"
        lines.append(f"| {row['method']} | {row['images']} | {row.get('form', '')} | {row['seconds']:.1f} | "
                     f"{row['peak_gb']:.2f} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000], help="numbers of images N")
    parser.add_argument("--methods", nargs="+", default=["fast_ntk", "ssd"], choices=["fast_ntk", "ssd"])
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/fast_ntk_scale.json"))
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]))))
        return
    rows = []
    for count in args.sizes:
        for method in args.methods:
            done = subprocess.run([sys.executable, __file__, "--worker", method, str(count)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{method} at N={count} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{method} N={count}: {rows[-1]['seconds']:.1f} s, {rows[-1]['peak_gb']:.2f} GB", flush=True)
    print(table(rows))
    from genunlearn.storage.files import atomic_write_text

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps({"targets": {"images": TARGET_SIZE, "seconds": TARGET_SECONDS, "gb": TARGET_GB},
                                               "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
