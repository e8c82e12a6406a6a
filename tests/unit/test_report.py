"""docs/results.md is what the committed result files say, and every result file is in it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def test_results_page_is_generated_from_the_json() -> None:
    assert report.main(["--check"]) == 0, "run: python benchmarks/report.py"


def test_every_result_file_has_a_section() -> None:
    rendered = {name for name, *_ in report.SECTIONS}
    committed = {p.name for p in report.RESULTS.glob("*.json")}
    assert committed <= rendered, f"no section renders {sorted(committed - rendered)}"


def test_check_fails_when_the_page_differs(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "results.md"
    stale.write_text(report.render().replace("0.433", "0.999"))
    monkeypatch.setattr(report, "DOC", stale)
    assert report.main(["--check"]) == 1
