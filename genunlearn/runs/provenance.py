"""What a run ran on, for reproducing its figures: library versions, the device, the command, the code revision, times."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from accelerate import Accelerator

import genunlearn
from genunlearn.precision import numerics

LIBRARIES = ("diffusers", "accelerate", "timm", "torchmetrics", "safetensors", "clean-fid")


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (``2026-11-26T10:54:29Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(accelerator: Accelerator) -> dict:
    """Python and library versions, the device (type and name; CUDA and cuDNN versions on a GPU), processes, threads,
    and the numerics (``genunlearn.precision.numerics``: mixed precision, TF32, the draws' scheme)."""
    device = accelerator.device
    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,  # with its build tag (+cu130, +cpu)
        **{name: _version(name) for name in LIBRARIES},
        "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "processes": accelerator.num_processes,
        "threads": torch.get_num_threads(),
        **numerics(accelerator),
    }
    if device.type == "cuda":
        record.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return record


def revision() -> str:
    """``git describe`` of the checkout genunlearn runs from (``-dirty`` with local changes), else its version."""
    checkout = Path(genunlearn.__file__).resolve().parents[1]
    if (checkout / ".git").exists():
        try:
            described = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty", "--tags"],
                                       capture_output=True, text=True, timeout=10)
            if described.returncode == 0 and described.stdout.strip():
                return described.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return genunlearn.__version__


def provenance(accelerator: Accelerator, started_at: str) -> dict:
    """The report's provenance keys: ``environment``, ``command``, ``genunlearn_revision``, ``started_at``,
    ``finished_at`` (now)."""
    return {"environment": environment(accelerator), "command": list(sys.argv), "genunlearn_revision": revision(),
            "started_at": started_at, "finished_at": utc_now()}
