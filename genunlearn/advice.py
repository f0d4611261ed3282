"""Warnings that name the fix, raised before or right after a run wastes time or misleads (``UnlearningWarning``):
the library raises them as Python warnings; the command line prints each as one ``warning:`` line."""

from __future__ import annotations

import logging
import warnings


class UnlearningWarning(UserWarning):
    """A setting or result that likely wastes the run or misleads, with what to do instead."""


def advise(message: str, main_process: bool = True) -> None:
    """Warn with ``message`` (once per run: only ``main_process`` warns, so N processes do not print it N times)."""
    if main_process:
        warnings.warn(message, UnlearningWarning, stacklevel=3)


def print_as_lines() -> None:
    """Show ``UnlearningWarning``s as ``warning: MESSAGE`` lines on genunlearn's console logger (the command line);
    other warnings keep Python's own format."""
    shown = warnings.showwarning
    if getattr(shown, "genunlearn_lines", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnlearningWarning):
            logging.getLogger("genunlearn").warning(f"warning: {message}")  # the console (genunlearn.progress)
        else:
            shown(message, category, filename, lineno, file, line)

    show.genunlearn_lines = True
    warnings.showwarning = show
