"""Start-up time: whole processes, timed against ``python -c "import torch"`` in the same run.

    python benchmarks/import_time.py              # 7 runs of each command, medians; writes results/import_time/<machine>.json
    python benchmarks/import_time.py --runs 3

Targets (issue 33): ``import genunlearn`` <= 2 s and ``genunlearn --help`` <= 1.5 s. Time nothing else meanwhile:
other processes on the cores stretch every figure. ``python benchmarks/tables.py`` puts the committed cells in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from genunlearn.storage.files import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "import_time"
CLI = shutil.which("genunlearn") or f"{sys.executable} -m genunlearn"
COMMANDS = {  # label -> argv; the first is the floor every Python process pays
    "python (nothing imported)": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import genunlearn": [sys.executable, "-c", "import genunlearn"],
    "genunlearn --help": [*CLI.split(), "--help"],
    "genunlearn forget --help": [*CLI.split(), "forget", "--help"],
    "import genunlearn; genunlearn.unlearn (first use)": [sys.executable, "-c", "import genunlearn; genunlearn.unlearn"],
}
TARGETS = {"import genunlearn": 2.0, "genunlearn --help": 1.5}


def timed(argv: list[str]) -> float:
    """Wall seconds of one run of ``argv`` (its output discarded; a failure stops the benchmark)."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(runs: int) -> dict[str, dict]:
    """``{label: {median_s, min_s, max_s, runs}}``; the commands interleaved run by run, so a slow spell hits all."""
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for _ in range(runs):
        for label, argv in COMMANDS.items():
            times[label].append(timed(argv))
    return {label: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": runs}
            for label, v in times.items()}


def render(cell: dict) -> str:
    """The markdown table of one cell: each command's median (min-max), its ratio to ``import torch``, its target."""
    torch_s = cell["rows"]["import torch"]["median_s"]
    lines = [f"Whole processes on {cell['machine']} ({cell['cpus']} CPUs; median of {cell['runs']} interleaved runs):", "",
             "| command | median s (min-max) | / import torch | target |", "|---|---|---|---|"]
    for label, row in cell["rows"].items():
        target = TARGETS.get(label)
        verdict = "" if target is None else f"<= {target} s: {'met' if row['median_s'] <= target else 'missed'}"
        lines.append(f"| `{label}` | {row['median_s']:.2f} ({row['min_s']:.2f}-{row['max_s']:.2f}) | "
                     f"{row['median_s'] / torch_s:.2f} | {verdict} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    machine = f"{platform.machine()}-{os.cpu_count()}cpu"
    cell = {"machine": machine, "cpus": os.cpu_count(), "python": platform.python_version(), "runs": args.runs,
            "rows": measure(args.runs)}
    print(render(cell))
    path = RESULTS / f"{machine}.json"
    atomic_write_text(path, json.dumps(cell, indent=2) + "\n")  # a killed run leaves the previous cell
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
