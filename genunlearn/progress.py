"""The console: progress bars on a terminal or in a notebook (``tqdm.auto``: a widget there); a file or a CI log would
fill with carriage returns and escape codes, so there genunlearn's logger writes a plain line per logged step
instead, from the command line and the library alike (``run.log`` is ``genunlearn.runs.logs``')."""

from __future__ import annotations

import logging
import sys
from typing import Iterable

from tqdm.auto import tqdm

from genunlearn.advice import print_as_lines

_hidden = False  # -q hides the bars too
LOGGER = logging.getLogger("genunlearn")


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


def configure_console(verbosity: int = 0, libraries: bool = True) -> None:
    """Progress on stderr: bars on a terminal or in a notebook (``genunlearn.progress``), else one log line per logged
    step.
    ``verbosity``: -1 (``-q``) warnings only, no bars; 0 the default; 1 (``-v``) debug lines too. ``libraries``: also
    turn off diffusers' and transformers' own bars where genunlearn's are off (it imports them: a command does it
    once its options are parsed, so ``--help`` stays instant)."""
    hide_bars(verbosity < 0)
    terminal = bars_drawn()
    if libraries and (verbosity < 0 or not terminal):
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
    print_as_lines()


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
