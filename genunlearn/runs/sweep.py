"""``genunlearn sweep``: the forget job once per cell of a grid of method settings (and per seed), each into its own
run folder under one sweep folder, then a table and a heat-map of the outcomes; a cell meets the targets when its
mean over seeds does, and is robust when every grid neighbour meets them too.

sweep.json: {model, class, method, kind, axes: [[key, [values]]], seeds, targets: {"forget_acc<=": 0.05, ...},
cells: [{settings, folder, figures: {name: {mean, std, values}}, meets, robust}]}. Diffusion and text-to-image figures:
forget_acc, fid_ratio (FID of the remaining classes or prompts after / before), remain_acc, steps, wall_time_s;
classifier figures: forget_acc, retain_acc, test_acc, steps, wall_time_s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import operator
from pathlib import Path

from accelerate import Accelerator

from genunlearn.errors import UserError
from genunlearn.eval.plots import plt, save_figure
from genunlearn.eval.seeds import mean_std
from genunlearn.runs.forget import run_seeds
from genunlearn.methods.registry import method_config
from genunlearn.models.presets import get_preset
from genunlearn.runs.job import RUN_FILE, ForgetJob, read_run_file
from genunlearn.storage.files import atomic_write_text

Axis = tuple[str, list]
FIGURES = {
    "diffusion": ("forget_acc", "fid_ratio", "remain_acc", "steps", "wall_time_s"),
    "classifier": ("forget_acc", "retain_acc", "test_acc", "steps", "wall_time_s"),
}
FIGURES["text-to-image"] = FIGURES["diffusion"]
COMPARISONS = {"<=": operator.le, ">=": operator.ge}
SWEEP_FILE = "sweep-run.json"  # the sweep's identity, written before its first cell


def cell_folder(settings: dict) -> str:
    """A cell's folder name: ``key=value`` pairs joined by ``+``."""
    return "+".join(f"{k}={v}" for k, v in settings.items())


def report_figures(report: dict) -> dict[str, float]:
    """One run's sweep figures from its report (see the module docstring)."""
    after = report["after"]
    figures = {"forget_acc": after["forget_acc"], "steps": report["steps"], "wall_time_s": report["wall_time_s"]}
    if report["kind"] in ("diffusion", "text-to-image"):
        before = report["before"]["fid_remain"]
        figures.update(remain_acc=after["remain_acc"], fid_ratio=after["fid_remain"] / before if before else float("nan"))
    else:
        figures.update(retain_acc=after["retain_acc"], test_acc=after["test_acc"])
    return figures


def meets(figures: dict, targets: list[tuple[str, str, float]]) -> bool:
    return all(COMPARISONS[op](figures[name]["mean"], bound) for name, op, bound in targets)


def neighbours(index: tuple[int, ...], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Grid positions one step away along one axis."""
    found = []
    for axis, size in enumerate(shape):
        for step in (-1, 1):
            moved = index[axis] + step
            if 0 <= moved < size:
                found.append(index[:axis] + (moved,) + index[axis + 1:])
    return found


def run_sweep(job: ForgetJob, axes: list[Axis], seeds: list[int], targets: list[tuple[str, str, float]],
              accelerator: Accelerator) -> dict:
    """Run ``job`` with every combination of the ``axes`` values (over ``seeds``; finished runs reused) into
    ``job.output_dir/<cell>/seed-<s>``, then write sweep.json, sweep.md and heatmap.png there (main process)."""
    if not axes:
        raise UserError("give at least one axis, e.g. --set mask_threshold=1,2,3")
    if len({key for key, _ in axes}) != len(axes):
        raise UserError("each sweep axis may appear once; give its values comma-separated")
    kinds = [kind for kind, names in FIGURES.items() if all(name in names for name, _, _ in targets)]
    if not kinds:
        raise UserError("the targets mix classifier and diffusion figures; " +
                        "; ".join(f"{kind}: {', '.join(names)}" for kind, names in FIGURES.items()))
    shape = tuple(len(values) for _, values in axes)
    grid = {index: {key: values[i] for (key, values), i in zip(axes, index)}
            for index in itertools.product(*(range(size) for size in shape))}
    preset = get_preset(job.model)
    for settings in grid.values():  # every cell's settings checked before the first cell runs
        method_config(job.method, preset, {"seed": job.seed, **job.settings, **settings})
    record = {"sweep": job.identity(), "axes": [[k, v] for k, v in axes], "seeds": seeds}
    if accelerator.is_main_process:
        claim_sweep_dir(job.output_dir, record)
    accelerator.wait_for_everyone()
    cells, reports = [], {}
    for index, settings in grid.items():
        folder = cell_folder(settings)
        cell_job = dataclasses.replace(job, settings={**job.settings, **settings}, output_dir=job.output_dir / folder)
        run_seeds(cell_job, seeds, accelerator)
        runs = [json.loads((cell_job.output_dir / f"seed-{s}" / "report.json").read_text()) for s in seeds] \
            if accelerator.is_main_process else []
        reports[index] = runs
        cells.append({"index": index, "settings": settings, "folder": folder})
    sweep = {"model": job.model, "class": job.forgotten(), "method": job.method, "axes": [[k, v] for k, v in axes],
             "seeds": seeds, "targets": {f"{name}{op}": bound for name, op, bound in targets}, "cells": cells}
    if accelerator.is_main_process:
        kind = next(iter(reports.values()))[0]["kind"]
        for cell in cells:
            per_run = [report_figures(r) for r in reports[cell["index"]]]
            cell["figures"] = {name: mean_std([f[name] for f in per_run]) for name in FIGURES[kind]}
            cell["meets"] = bool(targets) and meets(cell["figures"], targets)
        by_index = {cell["index"]: cell for cell in cells}
        for cell in cells:
            cell["robust"] = cell["meets"] and all(by_index[n]["meets"] for n in neighbours(cell["index"], shape))
        sweep["kind"] = kind
        for cell in cells:
            cell["index"] = list(cell["index"])
        atomic_write_text(job.output_dir / "sweep.json", json.dumps(sweep, indent=2))
        atomic_write_text(job.output_dir / "sweep.md", render_sweep(sweep))
        save_heatmap(sweep, job.output_dir / "heatmap.png")
    accelerator.wait_for_everyone()
    return sweep


def claim_sweep_dir(out: Path, record: dict) -> None:
    """Write ``out/SWEEP_FILE`` (the sweep's identity) unless ``out`` already holds this sweep (a killed sweep
    continues); a UserError for a folder holding anything else: a run, another sweep, other files."""
    marker = out / SWEEP_FILE
    if marker.is_file():
        held = read_run_file(marker)
        if held == record:
            return
        raise UserError(f"{out} holds another sweep; choose a new --output-dir (nothing is overwritten)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a forget run" if (out / RUN_FILE).is_file() else "other files"
        raise UserError(f"{out} holds {what}, not this sweep; choose a new --output-dir (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(record, indent=2))


def _cell_text(figures: dict, name: str) -> str:
    stats = figures[name]
    return f"{stats['mean']:.0f}" if name == "steps" else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def render_sweep(sweep: dict) -> str:
    """Markdown: one row per cell, its settings, figures (mean ± std over seeds) and the target verdicts."""
    keys = [key for key, _ in sweep["axes"]]
    names = [name for name in FIGURES[sweep["kind"]] if name not in keys]
    targets = ", ".join(f"{k}{v:g}" for k, v in sweep["targets"].items()) or "none given"
    ratio = "" if sweep["kind"] == "classifier" else " fid_ratio: FID of the remaining classes (prompts) after / before unlearning."
    lines = [f"# Sweep: {sweep['method']} on {sweep['model']}, forget {sweep['class']}", "",
             f"Seeds {sweep['seeds']}; mean ± sample std over them. Targets: {targets}. Robust: the cell and every grid "
             f"neighbour meet them.{ratio}", "", "![heat-map](heatmap.png)", "",
             "| " + " | ".join(keys + list(names)) + " | meets | robust | run |", "|" + "---|" * (len(keys) + len(names) + 3)]
    for cell in sweep["cells"]:
        values = [str(cell["settings"][k]) for k in keys] + [_cell_text(cell["figures"], n) for n in names]
        lines.append("| " + " | ".join(values) + f" | {'yes' if cell['meets'] else 'no'} | {'yes' if cell['robust'] else 'no'} | "
                     f"[{cell['folder']}]({cell['folder']}/seed-{sweep['seeds'][0]}/report.md) |")
    return "\n".join(lines + [""])


def save_heatmap(sweep: dict, path) -> None:
    """Forget accuracy per cell (colour; lower is better), the cell's second figure written in it, target-meeting
    cells framed and robust ones starred. Rows: the first axis with several values; columns: the second; one panel
    per value of the rest (single-valued axes only name the panels)."""
    order = sorted(range(len(sweep["axes"])), key=lambda i: len(sweep["axes"][i][1]) == 1)
    axes = [sweep["axes"][i] for i in order]
    rows_key, rows = axes[0]
    cols_key, cols = axes[1] if len(axes) > 1 else ("", [""])
    extra = axes[2:]
    panels = list(itertools.product(*(range(len(v)) for _, v in extra))) or [()]
    second = "test_acc" if sweep["kind"] == "classifier" else "fid_ratio"
    cells = {tuple(c["index"][i] for i in order): c for c in sweep["cells"]}  # keyed in the plotted axis order
    figure, grid = plt.subplots(1, len(panels), figsize=(1.3 * len(cols) * len(panels) + 2.5, 0.9 * len(rows) + 2), squeeze=False)
    for axis, panel in zip(grid[0], panels):
        values = [[cells[(r, c, *panel)[: len(axes)]]["figures"]["forget_acc"]["mean"] for c in range(len(cols))] for r in range(len(rows))]
        image = axis.imshow(values, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
        for r in range(len(rows)):
            for c in range(len(cols)):
                cell = cells[(r, c, *panel)[: len(axes)]]
                mark = " *" if cell["robust"] else ""
                axis.text(c, r, f"{values[r][c]:.2f}{mark}\n{second} {cell['figures'][second]['mean']:.2f}", ha="center",
                          va="center", fontsize=7, fontweight="bold" if cell["meets"] else "normal")
                if cell["meets"]:
                    axis.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
        axis.set_xticks(range(len(cols)), [str(v) for v in cols])
        axis.set_yticks(range(len(rows)), [str(v) for v in rows])
        axis.set(xlabel=cols_key, ylabel=rows_key,
                 title=", ".join(f"{k}={v[i]}" for (k, v), i in zip(extra, panel)) or "forget_acc (colour)")
    figure.colorbar(image, ax=grid[0][-1], label="forget_acc (mean over seeds)")
    figure.suptitle(f"{sweep['method']} on {sweep['model']}, class {sweep['class']}: framed = meets targets, * = robust", fontsize=9)
    save_figure(figure, path, dpi=90)
