"""Progress bars on a terminal or in a notebook (``tqdm.auto``: a widget there); a file or a CI log would fill with
carriage returns and escape codes, so there the run logs a plain line per logged step instead
(``genunlearn.runs.logs``), from the command line and the library alike."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm

_hidden = False  # -q hides the bars too


def hide_bars(hidden: bool) -> None:
    """Hide (or show again) every progress bar genunlearn draws."""
    global _hidden
    _hidden = hidden


def in_notebook() -> bool:
    """Whether this process is a Jupyter (IPython) kernel, where ``tqdm.auto`` draws a widget."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


def bars_drawn() -> bool:
    """Whether progress bars are drawn here: on a terminal or in a notebook, unless hidden."""
    return not _hidden and (sys.stderr.isatty() or in_notebook())


def progress(iterable: Iterable | None = None, *, desc: str, show: bool = True, **options) -> tqdm:
    """``tqdm(iterable, desc=desc, **options)``, drawn only when ``show`` (e.g. on the main process) and
    ``bars_drawn()``; otherwise a silent pass-through."""
    return tqdm(iterable, desc=desc, disable=not (show and bars_drawn()), **options)
