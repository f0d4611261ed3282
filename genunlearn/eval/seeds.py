"""Several seeds of one run: mean ± std of every figure, as ``summary.json`` and ``summary.md``.

summary.json: {schema_version, model, class, method, seeds, runs (folder per seed), and for each of
before, after, oracle, gap_to_oracle present in every run: {figure: {mean, std, values}}}. std is the sample
standard deviation (n - 1 in the denominator; 0 for one seed); values are per seed, in ``seeds`` order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from genunlearn.eval.report import SCHEMA_VERSION
from genunlearn.storage.files import atomic_write_text

PHASES = ("before", "after", "oracle", "gap_to_oracle")


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "values"}``; std with n - 1 in the denominator (0 for a single value)."""
    mean = sum(values) / len(values)
    spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(spread), "values": values}


def aggregate_reports(reports: list[dict], seeds: list[int], runs: list[str]) -> dict:
    """Mean ± std over ``reports`` (one per seed) of every numeric figure the phases hold in all of them."""
    summary = {"schema_version": SCHEMA_VERSION, **{k: reports[0][k] for k in ("kind", "model", "class", "method")},
               "seeds": seeds, "runs": runs}
    for phase in PHASES:
        if not all(phase in r for r in reports):
            continue
        keys = [k for k, v in reports[0][phase].items() if isinstance(v, (int, float)) and not k.endswith("_time_s")
                and all(isinstance(r[phase].get(k), (int, float)) for r in reports)]
        summary[phase] = {k: mean_std([float(r[phase][k]) for r in reports]) for k in keys}
    return summary


def _cell(stats: dict | None) -> str:
    return "" if stats is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def render_summary(summary: dict) -> str:
    """Markdown: one row per figure, mean ± std for each phase, and links to the per-seed reports."""
    phases = [p for p in PHASES if p in summary]
    keys = list(dict.fromkeys(k for p in phases for k in summary[p]))
    lines = [f"# {summary['method']} on {summary['model']}: forget {summary['class']}, {len(summary['seeds'])} seeds",
             "", f"Seeds {summary['seeds']}; mean ± sample std (n - 1).", "",
             "| figure | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_cell(summary[p].get(key)) for p in phases) + " |")
    lines += ["", "Per-seed reports: " + ", ".join(f"[{run}]({run}/report.md)" for run in summary["runs"]), ""]
    return "\n".join(lines)


def write_summary(output_dir: Path, summary: dict) -> None:
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(output_dir / "summary.md", render_summary(summary))


def summary_line(summary: dict, output_dir: Path, keys: tuple[str, ...]) -> str:
    """One terminal line: the headline figures after unlearning, mean ± std."""
    figures = ", ".join(f"{k} {summary['after'][k]['mean']:.3f} ± {summary['after'][k]['std']:.3f}"
                        for k in keys if k in summary["after"])
    return (f"{summary['method']} on {summary['model']} over seeds {summary['seeds']}: after {figures}; "
            f"wrote {output_dir}/summary.md")
