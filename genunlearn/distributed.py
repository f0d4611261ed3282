"""Creating the Accelerator so that a multi-process launch really forms one process group, GPUs or not."""

from __future__ import annotations

import atexit
import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

from genunlearn.errors import UserError
from genunlearn.precision import accelerate_mixed_precision, set_tf32


THREADS_ENV = "GENUNLEARN_THREADS"


def use_cpu_threads() -> None:
    """Give torch this process's share of the CPU cores (``$GENUNLEARN_THREADS`` if set).

    ``accelerate launch`` exports OMP_NUM_THREADS=1 unless told otherwise, which would leave a single-process
    run on one core of a multi-core machine.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(os.environ.get(THREADS_ENV, "0")) or max(1, (os.cpu_count() or 1) // local_processes)
    torch.set_num_threads(threads)


def make_accelerator(mixed_precision: str | None = None, tf32: bool | None = None, **kwargs) -> Accelerator:
    """``Accelerator(**kwargs)`` at an explicit precision (``genunlearn.precision``: ``mixed_precision`` no, fp16,
    bf16, or auto for the launcher's; TF32 on only with ``tf32``), with ``cpu=True`` on an accelerator-less machine
    under a multi-process launch. None keeps what an earlier accelerator of this process set (accelerate fixes the
    precision once per process), else means ``no`` and TF32 off.

    accelerate forms a gloo group on CPU only when told ``cpu=True``; without it,
    ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine runs two independent copies.
    """
    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if mixed_precision is None:
        mixed_precision = earlier or "no"
    kwargs["mixed_precision"] = accelerate_mixed_precision(mixed_precision)
    if tf32 is not None or earlier is None:
        set_tf32(bool(tf32))
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
