"""Creating the Accelerator so that a multi-process launch really forms one process group, GPUs or not."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

from genunlearn.errors import UserError


def make_accelerator(**kwargs) -> Accelerator:
    """``Accelerator(**kwargs)``, with ``cpu=True`` on an accelerator-less machine under a multi-process launch.

    accelerate forms a gloo group on CPU only when told ``cpu=True``; without it,
    ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine runs two independent copies.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_only = not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())
    cpu = kwargs.pop("cpu", False) or (world_size > 1 and cpu_only)
    accelerator = Accelerator(cpu=cpu, **kwargs)
    if accelerator.num_processes != world_size:
        raise UserError(
            f"launched {world_size} processes but accelerate formed a group of {accelerator.num_processes}; "
            "check the launcher's settings (`accelerate config`)"
        )
    return accelerator
