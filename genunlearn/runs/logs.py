"""Run logs: ``run.log`` in every run folder (the command, the run, progress, warnings, the final line), and plain
progress lines instead of progress bars when stderr is not a terminal (a file or a CI log would fill with carriage
returns and escape codes)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator

from genunlearn.progress import bars_drawn, hide_bars
from genunlearn.runs.job import LOG_FILE

LOGGER = logging.getLogger("genunlearn")
FORMAT = "%(asctime)s %(message)s"


def configure_console(verbosity: int = 0) -> None:
    """Progress on stderr: bars on a terminal or in a notebook (``genunlearn.progress``), else one log line per logged
    step.
    ``verbosity``: -1 (``-q``) warnings only, no bars; 0 the default; 1 (``-v``) debug lines too."""
    hide_bars(verbosity < 0)
    terminal = bars_drawn()
    if verbosity < 0 or not terminal:
        hide_library_bars()
    level = logging.WARNING if verbosity < 0 or (terminal and verbosity == 0) else logging.DEBUG if verbosity > 0 else logging.INFO
    LOGGER.setLevel(logging.DEBUG)
    for old in [h for h in LOGGER.handlers if getattr(h, "genunlearn_console", False)]:
        LOGGER.removeHandler(old)  # bound to the stderr of its time, which a caller may have replaced (and closed)
    console = logging.StreamHandler(sys.stderr)
    console.genunlearn_console = True
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(level)
    LOGGER.addHandler(console)


def library_console() -> None:
    """The command line's console for a library caller who configured no logging (neither genunlearn's logger nor the
    root one has a handler), so a notebook or a log file shows progress too; a caller's own logging is left alone."""
    if not LOGGER.handlers and not logging.getLogger().handlers:
        configure_console()


def hide_library_bars() -> None:
    """Turn off the bars diffusers, transformers and huggingface_hub draw themselves (loading a pipeline's components
    or a text encoder's weights, downloads)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


@contextmanager
def run_log(folder: Path, accelerator: Accelerator) -> Iterator[None]:
    """Append everything genunlearn logs, and Python warnings, to ``folder/run.log`` for the block (main process)."""
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
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger in (LOGGER, warnings_logger):
            logger.removeHandler(handler)
        handler.close()
