"""The per-kind adapter contract: what the run flow (``genunlearn.runs``) asks of a classifier, a diffusion model,
or any kind added later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from accelerate import Accelerator
from torch import nn

from genunlearn.data.split import ForgetSplit
from genunlearn.models.presets import Preset
from genunlearn.runs.job import ForgetJob
from genunlearn.tasks.base import Task

PIPELINE_DIR = "pipeline"  # where a generator run writes its unlearned pipeline
OracleStore = tuple[Callable[[nn.Module, Path], None], Callable[[Path], nn.Module], str]  # save, load, marker file


@dataclass
class GeneratorRun:
    """The common part of a generator kind's ``Run``: the job, what ``setup`` prepared (a task and split with their
    measures), the accelerator, and the pipeline folder the weights are written to."""

    job: ForgetJob
    setup: Any
    accelerator: Accelerator
    weights: str = f"{PIPELINE_DIR}/"

    @property
    def task(self) -> Task:
        return self.setup.task

    @property
    def split(self) -> ForgetSplit:
        return self.setup.split

    def exports(self, model: nn.Module) -> dict:
        return {}


class Run(Protocol):
    """One prepared forget run of a kind: its task and split, how it measures a model, and what it writes."""

    task: Task
    split: ForgetSplit
    data_id: str  # what the retrain oracle's cache entry is keyed by
    weights: str  # the report's pointer to the written weights, relative to the run folder

    def evaluate_before(self) -> tuple[dict, Any]:
        """The original model's figures and visuals (``Any``: what ``write`` shows, e.g. sample grids)."""
        ...

    def evaluate(self, model: nn.Module) -> tuple[dict, Any]:
        """``model``'s figures and visuals, measured as the original's were."""
        ...

    def forget_accuracy(self, model: nn.Module) -> float:
        """The one figure a relearning curve follows."""
        ...

    def oracle_store(self) -> OracleStore:
        """How the cached retrain oracle is saved and loaded."""
        ...

    def report_entries(self) -> dict:
        """The kind's own report keys, placed before ``before``/``after`` (diffusion: the sampling protocol)."""
        ...

    def exports(self, model: nn.Module) -> dict:
        """Other forms of the unlearned ``model`` the run measures (and ``write`` writes), as report keys
        (text-to-image: the erasure as a LoRA); {} for none."""
        ...

    def write(self, model: nn.Module, output_dir: Path, before: Any, after: Any) -> str:
        """Write the unlearned ``model`` (and the visuals) into ``output_dir``; return how its weights load (markdown)."""
        ...


class Kind(Protocol):
    """Everything that differs between model kinds, once per stage."""

    name: str  # a preset's ``kind``

    def check_job(self, job: ForgetJob) -> None:
        """A UserError for what ``job`` asks that this kind cannot do, before any output folder is touched."""
        ...

    def check_evaluation(self, job: ForgetJob) -> None:
        """The same for ``genunlearn evaluate`` (which needs no target, or another one)."""
        ...

    def load_task(self, preset: Preset, *, pretrained: str | None, data: str | Path | None, cache_dir: str | Path | None,
                  accelerator: Accelerator) -> Task:
        """The preset's task with its data and weights (given, cached, or pretrained now)."""
        ...

    def prepare_run(self, job: ForgetJob, preset: Preset, accelerator: Accelerator) -> Run:
        """Load ``job``'s model and data and build its split and measures."""
        ...

    def evaluate_model(self, job: ForgetJob, preset: Preset,
                       accelerator: Accelerator) -> tuple[dict, Callable[[Path], None] | None]:
        """``genunlearn evaluate``'s report entries for ``job``'s model, and how to draw its samples into a PNG (or
        None: nothing to show)."""
        ...

    def pretrain_summary(self, task: Task, *, data: str | None, cache_dir: str | None,
                         accelerator: Accelerator) -> tuple[str, Callable[[Path], None]]:
        """A one-line quality figure of a freshly pretrained ``task``, and how to write its weights to a folder."""
        ...
