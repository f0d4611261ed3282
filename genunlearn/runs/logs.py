"""Run logs: ``run.log`` in every run folder (the command, the run, progress, warnings, the final line); the console
is ``genunlearn.progress``'s."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator

from genunlearn.advice import as_log_lines
from genunlearn.runs.job import LOG_FILE

LOGGER = logging.getLogger("genunlearn")
FORMAT = "%(asctime)s %(message)s"


@contextmanager
def run_log(folder: Path, accelerator: Accelerator) -> Iterator[None]:
    """Append everything genunlearn logs, and Python warnings, to ``folder/run.log`` for the block (main process);
    ``UnlearningWarning``s also reach the console as ``warning:`` lines."""
    if not accelerator.is_main_process:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    LOGGER.setLevel(logging.DEBUG)
    warnings_logger = logging.getLogger("py.warnings")
    for logger in (LOGGER, warnings_logger):
        logger.addHandler(handler)

    def to_run_log(message, category, filename, lineno, file=None, line=None) -> None:
        warnings_logger.warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    shown = warnings.showwarning
    warnings.showwarning = as_log_lines(to_run_log)  # advice on the console and in run.log, other warnings in run.log
    try:
        yield
    finally:
        warnings.showwarning = shown
        for logger in (LOGGER, warnings_logger):
            logger.removeHandler(handler)
        handler.close()
