"""The docs' result tables are what the committed cells give (``python benchmarks/tables.py`` regenerates them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_docs_tables_match_the_committed_cells(capsys):
    spec = importlib.util.spec_from_file_location("tables", BENCHMARKS / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def test_a_marker_is_replaced_by_its_table_and_nothing_else(monkeypatch):
    spec = importlib.util.spec_from_file_location("tables", BENCHMARKS / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    monkeypatch.setattr(tables, "table", lambda what: f"| table of {what} |")
    page = "prose\n<!-- results: fidelity x -->\nstale\nlines\n<!-- /results -->\nmore prose\n"
    assert tables.regenerate(page) == "prose\n<!-- results: fidelity x -->\n| table of fidelity x |\n<!-- /results -->\nmore prose\n"
