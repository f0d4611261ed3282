"""Warnings that name the fix, raised before or right after a run wastes time or misleads (``UnlearningWarning``):
the library raises them as Python warnings; the command line prints each as one ``warning:`` line."""

from __future__ import annotations

import logging
import warnings
from typing import Callable


class UnlearningWarning(UserWarning):
    """A setting or result that likely wastes the run or misleads, with what to do instead."""


def advise(message: str, main_process: bool = True) -> None:
    """Warn with ``message`` (once per run: only ``main_process`` warns, so N processes do not print it N times)."""
    if main_process:
        warnings.warn(message, UnlearningWarning, stacklevel=3)


def as_log_lines(other: Callable) -> Callable:
    """A ``warnings.showwarning`` that writes each ``UnlearningWarning`` as a ``warning: MESSAGE`` line on genunlearn's
    logger (its console, and a run's ``run.log`` while one runs) and hands every other warning to ``other``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnlearningWarning):
            logging.getLogger("genunlearn").warning(f"warning: {message}")
        else:
            other(message, category, filename, lineno, file, line)

    show.genunlearn_lines = True
    return show


def print_as_lines() -> None:
    """Show ``UnlearningWarning``s as ``warning: MESSAGE`` lines (the command line's console); other warnings keep
    Python's own format."""
    if not getattr(warnings.showwarning, "genunlearn_lines", False):
        warnings.showwarning = as_log_lines(warnings.showwarning)
