"""Regenerate the docs' result tables from the committed cells under benchmarks/results.

    python benchmarks/tables.py            # rewrite every generated table in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1 if any of them differs from what the cells give

A generated table sits between two markers in a page, which name what it shows:

    <!-- results: forget_quality ddpm-digits -->          the forget-quality summary of one preset
    <!-- results: forget_quality targets -->              the issue targets checked against it
    <!-- results: forget_quality processes -->            1-process runs against forget_quality-2proc's
    <!-- results: concept_erasure sd-digits [ROW ...] --> the concept-erasure rows of one preset (all, or these)
    <!-- results: erasure_table sd-digits -->           methods x erasure, attacks, utility and cost (attacked cells)
    <!-- results: device_parity NAME -->                  one device-parity comparison (results/device_parity/NAME.json)
    <!-- results: fidelity NAME -->                        one fidelity measurement (results/fidelity/NAME/*.json)
    <!-- results: import_time MACHINE -->                  start-up times on one machine (results/import_time/MACHINE.json)
    <!-- results: preset_fields -->                        every preset field's type, default and meaning (from the code)
    <!-- results: capacity -->                             state bytes per method and architecture (results/capacity)
    <!-- results: scale NAME -->                           one engine speed/memory run (results/scale/NAME.json)
    <!-- /results -->

Everything between the markers is replaced; the rest of the page is left as written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import capacity  # noqa: E402
import concept_erasure  # noqa: E402
import erasure_table  # noqa: E402
import device_parity  # noqa: E402
import fidelity  # noqa: E402
import scale  # noqa: E402
import forget_quality  # noqa: E402
import import_time  # noqa: E402

from genunlearn.errors import UserError  # noqa: E402

RESULTS = HERE / "results"
PAGES = [HERE.parent / "README.md", *sorted((HERE.parent / "docs").glob("*.md"))]
MARKED = re.compile(r"(<!-- results: (?P<what>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def table(what: str) -> str:
    """The markdown a marker names."""
    kind, *args = what.split()
    if kind == "forget_quality" and args[0] == "processes":  # the 1-process cells against forget_quality-2proc's
        return forget_quality.process_table(forget_quality.finished_cells(RESULTS / "forget_quality" / "cells"),
                                            forget_quality.finished_cells(RESULTS / "forget_quality-2proc" / "cells"))
    if kind == "forget_quality":
        rows = forget_quality.summarise(forget_quality.finished_cells(RESULTS / "forget_quality" / "cells"))
        return "\n".join(forget_quality.targets(rows)) if args == ["targets"] else forget_quality.preset_table(rows, args[0])
    if kind == "concept_erasure":
        cells = concept_erasure.finished_cells(RESULTS / "concept_erasure" / "cells", args[0])
        chosen = [c for c in cells if not args[1:] or c["row"] in args[1:]]
        return concept_erasure.render(concept_erasure.summarise(chosen))
    if kind == "erasure_table":
        cells = concept_erasure.finished_cells(RESULTS / "concept_erasure" / "cells", args[0], attacked=True)
        if not cells:
            raise UserError("no attacked cells")
        return erasure_table.render(erasure_table.summarise(cells))
    if kind == "device_parity":
        result = json.loads((RESULTS / "device_parity" / f"{args[0]}.json").read_text())
        a, b = result["a"], result["b"]
        label = lambda side: side["device_name"] if side["device"] == "cuda" else f"cpu ({side['threads']} threads)"  # noqa: E731
        return device_parity.render(result["rows"], label(a), label(b), result["seeds"])
    if kind == "fidelity":
        return fidelity.render(args[0], fidelity.finished_cells(args[0]))
    if kind == "preset_fields":
        from genunlearn.models.preset_fields import render

        return render()
    if kind == "scale":
        return scale.render(json.loads((RESULTS / "scale" / f"{args[0]}.json").read_text()))
    if kind == "capacity":
        return capacity.render(json.loads((RESULTS / "capacity" / "capacity.json").read_text()))
    if kind == "import_time":
        return import_time.render(json.loads((RESULTS / "import_time" / f"{args[0]}.json").read_text()))
    raise SystemExit(f"error: unknown results marker {what!r}")


def table_or_note(what: str) -> str:
    """``table(what)``, or a note that no cell of it has finished yet."""
    try:
        return table(what)
    except (FileNotFoundError, UserError):
        return f"*No finished cells yet for `{what}`.*"


def regenerate(text: str) -> str:
    return MARKED.sub(lambda m: m.group(1) + table_or_note(m.group("what")) + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        fresh = regenerate(text)
        if fresh != text:
            stale.append(page)
            if not args.check:
                page.write_text(fresh)
    for page in stale:
        print(f"{'out of date' if args.check else 'rewrote'}: {page.relative_to(HERE.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
