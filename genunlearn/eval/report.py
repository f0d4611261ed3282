"""The run report: ``report.json`` (schema below, stable) and ``report.md``, both written atomically.

report.json keys (schema_version 1):
  schema_version, genunlearn_version, model, class (int, list of ints, or null for random forgetting),
  method, steps, wall_time_s (the method's own time), processes, split (spec and part sizes),
  config (the method's settings), method_info (mask_kept_fraction, mask_time_s, mask_cached for
  masked methods), before / after (forget_acc, forget_test_acc, retain_acc, test_acc,
  mia: fractions in [0, 1] or null; eval_time_s), log (figures every log_every steps), weights (path).
"""

from __future__ import annotations

import json
from pathlib import Path

from genunlearn.models.store import atomic_write_text

SCHEMA_VERSION = 1
METRIC_KEYS = ("forget_acc", "forget_test_acc", "retain_acc", "test_acc", "mia")
REQUIRED_KEYS = ("model", "class", "method", "steps", "wall_time_s", "before", "after")


def write_report(output_dir: Path, report: dict) -> None:
    """Write ``report.json`` and ``report.md`` into ``output_dir``."""
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(output_dir / "report.md", render_markdown(report))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_markdown(report: dict) -> str:
    """A human-readable summary: metrics before/after, the split and the method's settings."""
    before, after = report["before"], report["after"]
    lines = [
        f"# {report['method']} on {report['model']}: forget {report['split']['kind']} {report['class']}",
        "",
        f"{report['steps']} steps in {report['wall_time_s']:.1f} s on {report['processes']} process(es).",
        "",
        "| metric | before | after | change |",
        "|---|---|---|---|",
    ]
    for key in METRIC_KEYS:
        change = "" if before[key] is None or after[key] is None else f"{after[key] - before[key]:+.4f}"
        lines.append(f"| {key} | {_fmt(before[key])} | {_fmt(after[key])} | {change} |")
    lines += [
        "",
        "forget_acc: accuracy on the forget set D_f; forget_test_acc: on the forgotten classes' test images;",
        "retain_acc: on D_r; test_acc: on the retained classes' test images; mia: fraction of D_f that an",
        "entropy membership-inference attack calls a training member.",
        "",
        "## Split",
        "",
        *[f"- {k}: {v}" for k, v in report["split"].items()],
        "",
        "## Method settings",
        "",
        *[f"- {k}: {v}" for k, v in report["config"].items()],
        "",
        *(["## Method facts", "", *[f"- {k}: {v}" for k, v in report["method_info"].items()], ""] if report.get("method_info") else []),
        f"Unlearned weights: `{report['weights']}` (the original model is untouched).",
        "",
    ]
    return "\n".join(lines)
