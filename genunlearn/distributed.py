"""Creating the Accelerator so that a multi-process launch really forms one process group, GPUs or not."""

from __future__ import annotations

import atexit
import os

import torch
from accelerate import Accelerator
from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

from genunlearn.errors import UserError


THREADS_ENV = "GENUNLEARN_THREADS"


def use_cpu_threads() -> None:
    """Give torch this process's share of the CPU cores (``$GENUNLEARN_THREADS`` if set).

    ``accelerate launch`` exports OMP_NUM_THREADS=1 unless told otherwise, which would leave a single-process
    run on one core of a multi-core machine.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(os.environ.get(THREADS_ENV, "0")) or max(1, (os.cpu_count() or 1) // local_processes)
    torch.set_num_threads(threads)


def make_accelerator(**kwargs) -> Accelerator:
    """``Accelerator(**kwargs)``, with ``cpu=True`` on an accelerator-less machine under a multi-process launch.

    accelerate forms a gloo group on CPU only when told ``cpu=True``; without it,
    ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine runs two independent copies.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_only = not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())
    if cpu_only:
        use_cpu_threads()
    cpu = kwargs.pop("cpu", False) or (world_size > 1 and cpu_only)
    accelerator = Accelerator(cpu=cpu, **kwargs)
    if accelerator.num_processes != world_size:
        raise UserError(
            f"launched {world_size} processes but accelerate formed a group of {accelerator.num_processes}; "
            "check the launcher's settings (`accelerate config`)"
        )
    if accelerator.num_processes > 1:
        atexit.register(leave_process_group)
    return accelerator


def leave_process_group() -> None:
    """Destroy the process group at exit: a gloo group left to the interpreter's teardown can abort a process
    that finishes first ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
