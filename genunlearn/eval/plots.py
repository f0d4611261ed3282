"""Figures written atomically (matplotlib, file backend), and the curves of a run's logged figures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

from genunlearn.storage.files import make_readable


def save_log_curves(log: list[dict], path: Path, title: str) -> bool:
    """One panel per logged figure (loss terms, gradient norms, learning rate, forget weight) against the step.
    Returns False (and writes nothing) when the log holds fewer than two entries."""
    if len(log) < 2:
        return False
    keys = sorted({k for entry in log for k in entry if k != "step"})
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        points = [(entry["step"], entry[key]) for entry in log if key in entry]
        axis.plot(*zip(*points), marker=".")
        axis.set(title=key, xlabel="step")
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    figure.suptitle(title)
    save_figure(figure, path)
    return True


def save_figure(figure: plt.Figure, path: Path, dpi: int = 100) -> None:
    """Lay out ``figure``, write it to ``path`` (PNG) through a staging file renamed into place, and close it."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(handle)
    figure.savefig(staging, dpi=dpi)
    make_readable(Path(staging))
    plt.close(figure)
    os.replace(staging, path)
