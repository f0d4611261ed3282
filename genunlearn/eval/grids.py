"""PNG sample grids: one row per class, labelled, forgotten rows marked, before and after side by side."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from matplotlib.patches import Rectangle
from torchvision.utils import make_grid

from genunlearn.eval.plots import plt, save_figure

SAMPLES_FILE = "samples.png"  # in every diffusion run and evaluation folder
PADDING = 2  # pixels between samples, in sample pixels
FORGOTTEN_COLOUR = "#d62728"
DISPLAY_PIXELS = 32  # small samples (8x8 digits) are drawn this large, pixel for pixel (nearest)


def row_label(class_id: int, class_names: Sequence[str]) -> str:
    """``"3"`` for a class named by its id, ``"207 golden retriever"`` for a named one."""
    name = class_names[class_id] if class_id < len(class_names) else str(class_id)
    return name if name == str(class_id) else f"{class_id} {name}"


def save_samples_figure(panels: dict[str, dict[int, torch.Tensor]], path: Path, class_names: Sequence[str],
                        forgotten: Collection[int] = (), per_row: int = 8, numbered: bool = True,
                        marked: str = "forgotten class(es)") -> None:
    """Write one PNG of sample grids side by side, one panel per entry of ``panels`` (e.g. ``{"before": ..., "after":
    ...}``, each ``{class id: [n, C, H, W] in [-1, 1]}`` over the same classes and seeds): a row per class, its first
    ``per_row`` samples, labelled with the class name (and id, when ``numbered`` and the name is not it); forgotten
    classes' rows framed and labelled in red (``marked``: what the legend calls them)."""
    classes = sorted(next(iter(panels.values())))
    height, width = next(iter(panels.values()))[classes[0]].shape[-2:]
    scale = max(1, DISPLAY_PIXELS // max(height, width))
    columns = min(per_row, min(len(samples[c]) for samples in panels.values() for c in classes))
    row_pixels, column_pixels = height + PADDING, width + PADDING
    grid_size = (len(classes) * row_pixels + PADDING, columns * column_pixels + PADDING)
    labels = [row_label(c, class_names) if numbered else class_names[c] for c in classes]
    dpi, label_inches = 100, max(0.5, 0.1 * max(map(len, labels)))
    figure, axes = plt.subplots(1, len(panels), squeeze=False, dpi=dpi, figsize=(
        len(panels) * (grid_size[1] * scale / dpi + label_inches), grid_size[0] * scale / dpi + 0.7))
    for axis, (title, samples) in zip(axes.flat, panels.items()):
        images = torch.cat([samples[c][:columns].float().cpu() for c in classes])
        grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=columns, padding=PADDING, pad_value=1.0)
        axis.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(title)
        axis.set_xticks([])
        axis.set_yticks([PADDING + i * row_pixels + height / 2 for i in range(len(classes))],
                        labels)
        axis.tick_params(length=0)
        for row, (class_id, label) in enumerate(zip(classes, axis.get_yticklabels())):
            if class_id in forgotten:
                label.set_color(FORGOTTEN_COLOUR)
                label.set_fontweight("bold")
                axis.add_patch(Rectangle((0, row * row_pixels), grid_size[1] - 1, row_pixels + PADDING - 1, fill=False,
                                         edgecolor=FORGOTTEN_COLOUR, linewidth=2))
        for side in axis.spines.values():
            side.set_visible(False)
    if forgotten:
        figure.text(0.5, 0.005, f"red: {marked}; same seeds in every panel", ha="center", va="bottom",
                    fontsize=8, color=FORGOTTEN_COLOUR)
    save_figure(figure, path, dpi=dpi)
