"""Worker for test_sharded: ``top_k_entries`` over dim-0 shards (FSDP2's split: ceil(rows / N) rows per process, the
last ones short or empty) of tie-heavy scores, gathered; the main process writes them with the whole-tensor selection."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from genunlearn.distributed import make_accelerator
from genunlearn.engine.selection import top_k_entries

accelerator = make_accelerator()
rank, world = accelerator.process_index, accelerator.num_processes
generator = torch.Generator().manual_seed(0)
shapes = [(7, 3), (5,), (1, 4), (4, 2, 2), (3,)]  # (1, 4): the second process holds no rows of it
scores = [torch.randint(0, 4, shape, generator=generator).float() / 4 for shape in shapes]  # values 0, .25, .5, .75
total = sum(s.numel() for s in scores)
out = {}
for k in (0, 1, 9, total // 2, total - 3, total):
    shards = [s[-(-len(s) // world) * rank : -(-len(s) // world) * (rank + 1)] for s in scores]
    mine = top_k_entries(shards, k, sharded=True)
    everyone = [None] * world
    dist.all_gather_object(everyone, [m.tolist() for m in mine])
    for i, s in enumerate(scores):
        out[f"sharded.{k}.{i}"] = torch.cat([torch.tensor(parts[i], dtype=torch.bool).reshape(-1, *s.shape[1:])
                                             for parts in everyone]).to(torch.uint8)
        out[f"whole.{k}.{i}"] = top_k_entries(scores, k)[i].to(torch.uint8)
if accelerator.is_main_process:
    save_file(out, sys.argv[1])
accelerator.wait_for_everyone()  # both processes leave together: a gloo group torn down mid-write can abort the other
if torch.distributed.is_initialized():  # and close gloo before exit: its threads torn down at exit can abort
    torch.distributed.destroy_process_group()
