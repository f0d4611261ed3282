"""The run report: ``report.json`` (schema below, stable) and ``report.md``, both written atomically.

report.json keys (schema_version 1):
  schema_version, genunlearn_version, kind (classifier or diffusion), model, class (int, list of ints, or null for random forgetting),
  method, steps, wall_time_s (the method's own time), processes, split (spec and part sizes),
  config (the method's settings), method_info (mask_kept_fraction, mask_time_s, mask_cached for
  masked methods), before / after (forget_acc, forget_test_acc, retain_acc, test_acc,
  mia: fractions in [0, 1] or null; eval_time_s), log (figures every log_every steps), weights (path).
  Diffusion runs: before / after hold forget_acc, forget_entropy, forget_prob, remain_acc, fid_remain and
  per_class_acc, and evaluation records the sampling protocol, classifier and FID features.
"""

from __future__ import annotations

import json
from pathlib import Path

from genunlearn.models.store import atomic_write_text

SCHEMA_VERSION = 1
METRIC_KEYS = ("forget_acc", "forget_test_acc", "retain_acc", "test_acc", "mia")
METRIC_HELP = {
    "classifier": [
        "forget_acc: accuracy on the forget set D_f; forget_test_acc: on the forgotten classes' test images;",
        "retain_acc: on D_r; test_acc: on the retained classes' test images; mia: fraction of D_f that an",
        "entropy membership-inference attack calls a training member.",
    ],
    "diffusion": [
        "forget_acc: fraction of the forgotten class's samples that the evaluation classifier still labels as",
        "that class (forget_entropy, forget_prob: their mean softmax entropy and class probability);",
        "remain_acc: the same for the other classes; fid_remain: FID of the other classes' samples against",
        "the real retain images, in the evaluation classifier's features, under the protocol below.",
    ],
}
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
    for key, value in before.items():
        if key.endswith("_time_s") or not (value is None or isinstance(value, (int, float))):
            continue
        change = "" if value is None or after[key] is None else f"{after[key] - value:+.4f}"
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(after[key])} | {change} |")
    lines += ["", *METRIC_HELP[report["kind"]], ""]
    if "per_class_acc" in before:
        classes = list(before["per_class_acc"])
        lines += [
            "Per-class accuracy of generated samples (before / after):",
            "",
            "| class | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
            "| before | " + " | ".join(f"{before['per_class_acc'][c]:.2f}" for c in classes) + " |",
            "| after | " + " | ".join(f"{after['per_class_acc'][c]:.2f}" for c in classes) + " |",
            "",
            "Samples, one row per class, same seeds: ![before](samples_before.png) ![after](samples_after.png)",
            "",
            f"Evaluation protocol: {report['evaluation']}",
            "",
        ]
    lines += [
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


SUMMARY_KEYS = {
    "classifier": ("forget_acc", "retain_acc", "test_acc", "mia"),
    "diffusion": ("forget_acc", "remain_acc", "fid_remain"),
}


def summary_line(report: dict, output_dir: Path) -> str:
    """One line for the terminal: the headline metrics before -> after."""
    figures = ", ".join(
        f"{key} {report['before'][key]:.3f} -> {report['after'][key]:.3f}" for key in SUMMARY_KEYS[report["kind"]]
    )
    return (f"{report['method']} on {report['model']}: {figures} ({report['steps']} steps, "
            f"{report['wall_time_s']:.1f} s); wrote {output_dir}/report.md")
