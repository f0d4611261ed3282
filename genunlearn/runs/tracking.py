"""Experiment trackers (``--report_to``): a run's logged figures go to TensorBoard, Weights & Biases or any other
tracker accelerate knows, through accelerate's tracker classes and ``accelerator.log``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers

from genunlearn.errors import UserError

LOGGING_DIR = "logs"  # as diffusers' example scripts: OUTPUT_DIR/logs/<project>/
PROJECT = "genunlearn"
INSTALL = {"tensorboard": "pip install 'genunlearn[tensorboard]'"}


def tracker_names(report_to: str | None) -> list[str]:
    """accelerate's tracker names for ``--report_to`` (None or ``none``: none; ``all``: every installed one); a
    UserError for an unknown tracker or one whose package is not installed."""
    if report_to in (None, "none"):
        return []
    installed = [str(tracker) for tracker in get_available_trackers()]
    if report_to == "all":
        if not installed:
            raise UserError(f"--report_to all found no tracker installed; {INSTALL['tensorboard']} (or wandb, mlflow, ...)")
        return installed
    if report_to not in LOGGER_TYPE_TO_CLASS:
        raise UserError(f"unknown --report_to {report_to!r}; use tensorboard, wandb, all or none (accelerate also knows "
                        f"{', '.join(sorted(set(LOGGER_TYPE_TO_CLASS) - {'tensorboard', 'wandb'}))})")
    if report_to not in installed:
        raise UserError(f"--report_to {report_to} needs its package: {INSTALL.get(report_to, f'pip install {report_to}')}")
    return [report_to]


def loggable(config: dict) -> dict[str, bool | int | float | str]:
    """``config`` with every value a tracker's hyper-parameter table takes (lists, None and the like as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


@contextmanager
def experiment_trackers(report_to: str | None, folder: Path, accelerator: Accelerator, config: dict) -> Iterator[None]:
    """Start ``report_to``'s trackers for one run (local ones write under ``folder/logs/genunlearn``), record ``config``
    as its hyper-parameters, let ``accelerator.log`` reach them for the block, then finish them.

    Started per run rather than through ``Accelerator(log_with=...)``/``init_trackers``: one accelerator serves several
    runs (``--seeds``, sweeps) and a caller's own accelerator, and ``end_training`` would destroy its process group.
    """
    names = tracker_names(report_to)
    started: list[GeneralTracker] = []
    if accelerator.is_main_process:
        for name in names:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            needs_folder = tracker_class.requires_logging_directory
            tracker = tracker_class(PROJECT, folder / LOGGING_DIR) if needs_folder else tracker_class(PROJECT)
            tracker.start()
            tracker.store_init_configuration(loggable(config))
            started.append(tracker)
    accelerator.trackers.extend(started)
    try:
        yield
    finally:
        for tracker in started:
            tracker.finish()
            accelerator.trackers.remove(tracker)
