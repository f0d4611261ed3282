"""``genunlearn compare RUN ...``: one table (and a bar plot) of several runs' headline figures."""

from __future__ import annotations

import json
from pathlib import Path

from genunlearn.errors import UserError
from genunlearn.eval.plots import plt, save_figure
from genunlearn.eval.report import AVERAGE_GAP_KEYS, SUMMARY_KEYS, average_gap


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
    """A markdown table: run, model, method, class, steps, time (and the cost: total seconds, peak memory, output
    size), each headline figure before -> after, each attack's success rate before -> after (``--attack``); when any
    run has a retrain oracle (``--compare-retrain``), each figure's gap to it and the average gap too."""
    keys = list(dict.fromkeys(k for r in reports for k in SUMMARY_KEYS[r["kind"]]))
    with_oracle = any("gap_to_oracle" in r for r in reports)
    gap_columns = [*(f"gap {k}" for k in keys), "avg gap"] if with_oracle else []
    attacks = list(dict.fromkeys(name for r in reports for name in r.get("attacks", {})))
    costed = any("cost" in r for r in reports)
    cost_columns = ["total s", "peak MiB", "output MiB"] if costed else []
    columns = ["run", "model", "method", "class", "steps", "time s", *cost_columns, *keys,
               *(f"{name} ASR" for name in attacks), *gap_columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for run, report in zip(runs, reports):
        cells = [Path(run).name, report["model"], report["method"], str(report["class"]), str(report["steps"]),
                 f"{report['wall_time_s']:.1f}"]
        if costed:
            cells += cost_cells(report.get("cost"))
        cells += [f"{report['before'][k]:.3f} → {report['after'][k]:.3f}" if report["after"].get(k) is not None else ""
                  for k in keys]
        outcomes = report.get("attacks", {})
        cells += [f"{outcomes[n]['pre_asr']:.3f} → {outcomes[n]['post_asr']:.3f}" if n in outcomes else "" for n in attacks]
        if with_oracle:
            gaps, mean = report.get("gap_to_oracle", {}), average_gap(report)
            cells += [f"{gaps[k]:+.3f}" if k in gaps else "" for k in keys]
            cells.append("" if mean is None else f"{mean:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if costed:
        lines += ["", "time s: the method's own; total s: the whole run; peak MiB: CUDA's peak allocation on a GPU, "
                  "else the peak resident memory; output MiB: the model, pictures and exports on disk."]
    if with_oracle:
        averaged = "; ".join(f"{kind}: {', '.join(AVERAGE_GAP_KEYS[kind])}" for kind in dict.fromkeys(r["kind"] for r in reports))
        lines += ["", f"gap: after − the retrain oracle; avg gap: the mean absolute gap over {averaged} (SalUn's Avg. Gap)."]
    return "\n".join(lines)


def cost_cells(cost: dict | None) -> list[str]:
    """A run's total seconds, peak memory (CUDA's where used, else RSS) and output size, as table cells."""
    if not cost:
        return ["", "", ""]
    peak = cost["cuda_peak_mib"]["overall"] if cost["cuda_peak_mib"] else cost["peak_rss_mib"]
    output = cost.get("output_mib")
    return [f"{cost['total_s']:.1f}", f"{peak:.0f}", "" if output is None else f"{output:.1f}"]


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
