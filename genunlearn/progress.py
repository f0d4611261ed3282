"""Progress bars on a terminal only: a file or a CI log would fill with carriage returns and escape codes, so there
the run logs a plain line per logged step instead (``genunlearn.runs.logs``)."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm

_hidden = False  # -q hides the bars too


def hide_bars(hidden: bool) -> None:
    """Hide (or show again) every progress bar genunlearn draws."""
    global _hidden
    _hidden = hidden


def progress(iterable: Iterable | None = None, *, desc: str, show: bool = True, **options) -> tqdm:
    """``tqdm(iterable, desc=desc, **options)``, drawn only when ``show`` (e.g. on the main process), stderr is a
    terminal and bars are not hidden; otherwise a silent pass-through."""
    return tqdm(iterable, desc=desc, disable=_hidden or not show or not sys.stderr.isatty(), **options)
