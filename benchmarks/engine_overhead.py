"""Engine overhead: SFR-on iteration time / (2 x fine-tune step time) at the same batch size, plus mask time.

An SFR-on iteration (forget step every iteration) does two forward-backward passes, like two fine-tune
steps; everything else (adaptive weights, gradient masking, keeping masked-out weights in place,
clipping) is the engine's overhead. Blocks of fine-tune steps and SFR-on iterations alternate in one
process, so machine drift affects both alike; the ratio of medians is reported.

    python benchmarks/engine_overhead.py --model cnn-digits --model resnet18-digits
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from genunlearn import SplitSpec, load_task, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.engine.batches import BatchStream
from genunlearn.engine.geometry import SlowWeights
from genunlearn.engine.loop import LoopConfig, StepContext, make_optimizer
from genunlearn.methods.sfron import SFRonConfig, sfron_mask, sfron_step
from genunlearn.storage.files import atomic_write_text
from genunlearn.engine.training import supervised_step


def _context(task, split, cfg: LoopConfig, accelerator) -> StepContext:
    model = copy.deepcopy(task.model)
    optimizer = make_optimizer(cfg, model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    forget = BatchStream(split.forget, cfg.batch_size, 1, accelerator)
    retain = BatchStream(split.retain, cfg.batch_size, 2, accelerator)
    return StepContext(0, model, optimizer, accelerator, task, cfg, forget, retain)


def _time_block(ctx: StepContext, step_fn, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    started = time.perf_counter()
    for _ in range(steps):
        step_fn(ctx)
        ctx.step += 1
    return (time.perf_counter() - started) / steps


def measure(model_name: str, batch_size: int, blocks: int, block_steps: int, accelerator) -> dict:
    task = load_task(model_name, accelerator=accelerator)
    task.cache_dir = None  # time the Fisher/mask computation itself, not a cache read
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
    sfron_cfg = SFRonConfig(steps=10**6, batch_size=batch_size, forget_every=1, decay_forget_weight=False)
    started = time.perf_counter()
    mask, _ = sfron_mask(task, split, sfron_cfg, accelerator)
    mask_time = time.perf_counter() - started
    finetune = _context(task, split, LoopConfig(steps=10**6, batch_size=batch_size), accelerator)
    sfron = _context(task, split, sfron_cfg, accelerator)
    sfron_fn = partial(sfron_step, mask=mask, slow_weights=SlowWeights(1.0))
    _time_block(finetune, supervised_step, 3)  # warm-up
    _time_block(sfron, sfron_fn, 3)
    finetune_times, sfron_times = [], []
    for _ in range(blocks):
        finetune_times.append(_time_block(finetune, supervised_step, block_steps))
        sfron_times.append(_time_block(sfron, sfron_fn, block_steps))
    finetune_step, sfron_iteration = statistics.median(finetune_times), statistics.median(sfron_times)
    return {
        "model": model_name,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in task.model.parameters()),
        "finetune_step_s": finetune_step,
        "sfron_iteration_s": sfron_iteration,
        "overhead_ratio": sfron_iteration / (2 * finetune_step),
        "mask_time_s": mask_time,
        "mask_kept_fraction": mask.kept_fraction(),
        "blocks": blocks,
        "block_steps": block_steps,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="preset(s) to measure (default: cnn-digits and resnet18-digits)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=7, help="alternating timed blocks per method")
    parser.add_argument("--block-steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/engine_overhead.json"))
    args = parser.parse_args()
    accelerator = make_accelerator()
    rows = [measure(m, args.batch_size, args.blocks, args.block_steps, accelerator) for m in args.model or ["cnn-digits", "resnet18-digits"]]
    if accelerator.is_main_process:
        print(f"{'model':18s} {'batch':>5s} {'finetune step':>14s} {'SFR-on iter':>12s} {'ratio':>7s} {'mask time':>10s} {'kept':>6s}")
        for r in rows:
            print(f"{r['model']:18s} {r['batch_size']:5d} {r['finetune_step_s'] * 1e3:11.2f} ms {r['sfron_iteration_s'] * 1e3:9.2f} ms "
                  f"{r['overhead_ratio']:7.3f} {r['mask_time_s']:8.2f} s {r['mask_kept_fraction']:6.3f}")
        print("ratio = SFR-on iteration / (2 x fine-tune step); target <= 1.05")
        atomic_write_text(args.output, json.dumps({"device": str(accelerator.device), "results": rows}, indent=2))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
