"""Worker for test_sharded: methods on diffusion pipeline folders or a classifier preset (class 3), whole, DDP or
sharded (FSDP2), as the launch says; ``global_batch`` sets a per-process batch. Each job of the JSON list in argv[1] dumps (main process) the method's mask gathered whole
(SFR-on, SalUn, with ``masks``) and the unlearned weights to its ``out``; with ``exit_after_checkpoint`` every process
exits hard right after the first checkpoint (a killed launch)."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import genunlearn.engine.loop as loop
from genunlearn import SplitSpec, load_task, make_forget_split, unlearn
from genunlearn.distributed import make_accelerator
from genunlearn.methods.common import working_copy
from genunlearn.methods.registry import method_config
from genunlearn.methods.salun import salun_mask
from genunlearn.methods.sfron import sfron_mask


def whole(mask_part: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """A mask shard of ``param`` gathered into the whole parameter's shape."""
    if not hasattr(param, "full_tensor"):
        return mask_part
    from torch.distributed.tensor import DTensor

    shard = DTensor.from_local(mask_part.to(torch.uint8), param.device_mesh, param.placements, shape=param.shape,
                               stride=param.stride(), run_check=False)
    return shard.full_tensor().bool()


def run(job: dict, accelerator) -> None:
    task = load_task(job["preset"], pretrained=job.get("pipeline"), accelerator=accelerator)
    task.cache_dir = None  # computed here, never read from a cache
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
    per_process = {"batch_size": job["global_batch"] // accelerator.num_processes} if "global_batch" in job else {}
    settings = {**job["settings"], **per_process}
    tensors = {}
    if job.get("masks"):
        _, cfg = method_config(job["method"], task.preset, settings)
        model = working_copy(task, accelerator)
        mask, _ = (sfron_mask if job["method"] == "sfron" else salun_mask)(task, split, cfg, accelerator, model)
        tensors.update({f"mask.{n}": whole(k, p).to(torch.uint8).cpu() for (n, p), k in zip(model.named_parameters(), mask.keep)})
    if job.get("exit_after_checkpoint"):
        save = loop.save_loop_checkpoint

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            os._exit(3)

        loop.save_loop_checkpoint = save_then_die
    result = unlearn(task, split, job["method"], accelerator=accelerator, checkpoint_dir=job.get("checkpoint_dir"),
                     resume=job.get("resume", False), **settings)
    tensors.update({f"weights.{n}": p.detach().cpu().contiguous() for n, p in result.model.named_parameters()})
    tensors["sharded_over"] = torch.tensor(result.info.get("sharded_over", 0))
    if accelerator.is_main_process:
        save_file(tensors, job["out"])


accelerator = make_accelerator()
for job in json.loads(sys.argv[1]):
    run(job, accelerator)
accelerator.wait_for_everyone()  # both processes leave together: a gloo group torn down mid-write can abort the other
if torch.distributed.is_initialized():  # and close gloo before exit: its threads torn down at exit can abort
    torch.distributed.destroy_process_group()
