"""Worker for test_diffusion_job: SFR-on's Fishers, mask and weights after 3 iterations for a diffusion pipeline
folder (ddpm-digits, class 3), global batch 64 whatever the process count."""

import sys

import torch
from safetensors.torch import save_file

from genunlearn import SplitSpec, load_task, make_forget_split, unlearn
from genunlearn.distributed import make_accelerator
from genunlearn.engine.saliency import accumulate_gradients
from genunlearn.methods.registry import method_config
from genunlearn.methods.sfron import sfron_mask

pipeline_dir, out = sys.argv[1], sys.argv[2]
accelerator = make_accelerator()
task = load_task("ddpm-digits", pretrained=pipeline_dir, accelerator=accelerator)
task.cache_dir = None  # computed here, never read from a cache
split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
_, cfg = method_config("sfron", task.preset, {"batch_size": 64 // accelerator.num_processes})
mask, _ = sfron_mask(task, split, cfg, accelerator)
tensors = {f"mask.{n}": k.to(torch.uint8).cpu() for n, k in zip(mask.names, mask.keep)}
for part in ("forget", "retain"):
    fisher = accumulate_gradients(task.model, task.importance_loss, getattr(split, part), accelerator, batch_size=64)
    tensors.update({f"{part}.{n}": f.cpu().contiguous() for n, f in zip(mask.names, fisher)})
unlearned = unlearn(task, split, "sfron", steps=3, batch_size=64 // accelerator.num_processes, accelerator=accelerator).model
tensors.update({f"weights.{n}": p.detach().cpu().contiguous() for n, p in unlearned.named_parameters()})
if accelerator.is_main_process:
    save_file(tensors, out)
