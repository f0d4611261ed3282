"""``genunlearn compare RUN ...``: one table (and a bar plot) of several runs' headline figures."""

from __future__ import annotations

import json
from pathlib import Path

from genunlearn.errors import UserError
from genunlearn.eval.plots import plt, save_figure
from genunlearn.eval.report import SUMMARY_KEYS


REPORT_KEYS = ("kind", "model", "method", "class", "steps", "wall_time_s", "before", "after")


def load_reports(runs: list[Path]) -> list[dict]:
    """Each run folder's report.json; a UserError names a folder that holds none."""
    reports = []
    for run in runs:
        path = Path(run) / "report.json"
        if not path.is_file():
            raise UserError(f"{run} holds no report.json; pass run folders written by `genunlearn forget`")
        try:
            report = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not valid JSON; re-run that run or leave it out") from None
        missing = [key for key in REPORT_KEYS if not isinstance(report, dict) or key not in report]
        if missing:
            raise UserError(f"{path} is not a genunlearn forget report (no {missing[0]!r}); pass run folders written by "
                            "`genunlearn forget`")
        reports.append(report)
    return reports


def comparison_table(runs: list[Path], reports: list[dict]) -> str:
    """A markdown table: run, model, method, class, steps, time, and each headline figure before -> after."""
    keys = [k for kind in dict.fromkeys(r["kind"] for r in reports) for k in SUMMARY_KEYS[kind]]
    keys = list(dict.fromkeys(keys))
    lines = ["| run | model | method | class | steps | time s | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(keys)]
    for run, report in zip(runs, reports):
        figures = [f"{report['before'][k]:.3f} → {report['after'][k]:.3f}" if k in report["after"] else "" for k in keys]
        lines.append(f"| {Path(run).name} | {report['model']} | {report['method']} | {report['class']} | {report['steps']} | "
                     f"{report['wall_time_s']:.1f} | " + " | ".join(figures) + " |")
    return "\n".join(lines)


def save_comparison_plot(runs: list[Path], reports: list[dict], path: Path) -> None:
    """One panel per headline figure: each run's value after unlearning, the before value as a tick."""
    keys = list(dict.fromkeys(k for r in reports for k in SUMMARY_KEYS[r["kind"]]))
    figure, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    names = [Path(run).name for run in runs]
    for axis, key in zip(axes[0], keys):
        values = [r["after"].get(key) or 0.0 for r in reports]
        axis.bar(range(len(runs)), values)
        axis.scatter(range(len(runs)), [r["before"].get(key) or 0.0 for r in reports], marker="_", s=400, color="black",
                     label="before")
        axis.set(title=key, xticks=range(len(runs)))
        axis.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    axes[0][0].legend()
    save_figure(figure, path)
