"""What a run cost, as UnlearnCanvas reports it: wall time per stage, peak memory (process RSS; CUDA's peak allocation
where a GPU is used) and the output's size on disk. The report's ``cost`` section (``CostMeter.section``)."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

MIB = 2**20
STAGES = {
    "data": "the model, its data and the forget split (generating a text-to-image model's own training images)",
    "evaluation": "the model's figures (genunlearn evaluate)",
    "evaluation_before": "the original model's figures",
    "statistics": "the method's masks or Fishers (part of its own time, reported by it)",
    "unlearning": "the method's own time, less its statistics",
    "evaluation_after": "the unlearned model's figures",
    "exports": "what the run exports beside the model and measures (a LoRA and its figures)",
    "oracle_and_relearning": "the retrain oracle and relearning curves, when asked for",
    "attacks": "the attacks on the erasure, when asked for",
    "writing": "the model, pictures and reports written",
}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (MiB; Linux counts ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_mib(folder: Path, leave_out: tuple[str, ...] = ()) -> float:
    """The size on disk (MiB) of the files under ``folder``, less the top-level entries named in ``leave_out``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*")
               if path.is_file() and path.relative_to(folder).parts[0] not in leave_out) / MIB


class CostMeter:
    """Times the stages of one run (``with meter.stage("data"): ...``) on every process and keeps CUDA's peak
    allocation per stage where the accelerator's device is a GPU."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.cuda = accelerator.device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.cuda_peak_mib: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in STAGES:
            raise ValueError(f"unknown cost stage {name!r}")
        if self.cuda:
            torch.cuda.synchronize(self.accelerator.device)
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.accelerator.device)
                peak = torch.cuda.max_memory_allocated(self.accelerator.device) / MIB
                self.cuda_peak_mib[name] = max(self.cuda_peak_mib.get(name, 0.0), peak)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def move(self, seconds: float | None, source: str, target: str) -> None:
        """Move ``seconds`` that the work itself timed (a method's masks, an evaluation's attacks) from stage ``source``
        to stage ``target``."""
        if seconds and source in self.seconds:
            seconds = min(seconds, self.seconds[source])
            self.seconds[target] = self.seconds.get(target, 0.0) + seconds
            self.seconds[source] -= seconds

    def section(self) -> dict:
        """The report's ``cost``: ``stages_s`` (seconds per stage that ran, in ``STAGES``' order, on the main process),
        ``total_s``, ``peak_rss_mib`` (the largest over the processes), ``cuda_peak_mib`` (per stage and overall, or
        None without a GPU), ``device``; ``output_mib`` is added once the run is written (``folder_mib``). Every
        process calls it (the peaks are gathered)."""
        peaks = torch.tensor([peak_rss_mib(), max(self.cuda_peak_mib.values(), default=0.0)], device=self.accelerator.device)
        gathered = self.accelerator.gather(peaks[None]).reshape(-1, 2).amax(0).tolist() if self.accelerator.num_processes > 1 else peaks.tolist()
        stages = {name: self.seconds[name] for name in STAGES if name in self.seconds}
        return {
            "stages_s": stages,
            "total_s": sum(stages.values()),
            "peak_rss_mib": gathered[0],
            "cuda_peak_mib": ({"stages": {k: self.cuda_peak_mib[k] for k in STAGES if k in self.cuda_peak_mib},
                               "overall": gathered[1]} if self.cuda else None),
            "device": self.accelerator.device.type,
            "processes": self.accelerator.num_processes,
        }
