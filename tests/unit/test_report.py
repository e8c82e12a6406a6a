"""docs/results.md is what the committed result files say, and every result file is in it."""

from __future__ import annotations

import json
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
    stale.write_text(report.render().replace("# Results", "# Old results"))
    monkeypatch.setattr(report, "DOC", stale)
    assert report.main(["--check"]) == 1


def test_migration_overview_sets_each_task_its_goal_and_marks_the_runs_that_meet_it(tmp_path):
    """The goal is the source's accuracy, or 0.95 x ceiling (a) where (a) is below the source;
    a run's cell is the mean over its seeds, each seed's beside it; ceilings at other budgets
    come from their own files."""

    def acc(a: float) -> dict:
        return {"acc": a, "ci95": [max(0.0, a - 0.1), min(1.0, a + 0.1)]}

    ceilings = {"tasks": [
        {"task": "easy", "source": acc(0.4), "true_labels": acc(0.8)},
        {"task": "hard", "source": acc(0.5), "true_labels": acc(0.4)},
    ]}  # fmt: skip
    run = {"tasks": [
        {"task": "easy", "modes": {"filtered": {
            "acc": 0.35, "per_seed": [0.3, 0.4], "seconds": [100.0, 90.0],
            "paired_diff": -0.05, "paired_diff_ci": [-0.12, 0.02]}}},
        {"task": "hard", "modes": {"filtered": {
            "acc": 0.39, "per_seed": [0.38, 0.4], "seconds": [150.0, 200.0],
            "paired_diff": -0.11, "paired_diff_ci": [-0.2, -0.02]}}},
    ]}  # fmt: skip
    (tmp_path / "migration_ceilings.json").write_text(json.dumps(ceilings))
    (tmp_path / "migration_quality.json").write_text(json.dumps(run))
    short = {"tasks": [
        {"task": "easy", "source": acc(0.4), "true_labels": acc(0.5),
         "teacher_labels": acc(0.2)},
        {"task": "hard", "source": acc(0.5), "true_labels": acc(0.1), "teacher_labels": None},
    ]}  # fmt: skip
    (tmp_path / "migration_ceilings_steps60.json").write_text(json.dumps(short))
    text = report.migration_overview(tmp_path)
    goal = next(line for line in text.splitlines() if line.startswith("| goal"))
    assert "| 0.40 | 0.38 |" in goal  # 0.95 x 0.4 where (a) < source
    assert goal.endswith("| 0.390 |  |")  # the mean goal
    run_row = next(line for line in text.splitlines() if "migrated: the defaults" in line)
    assert "| 0.35 (0.30 / 0.40) |" in run_row and "0.39 (0.38 / 0.40) ✓" in run_row
    assert "| 0.370 |" in run_row and "0.370 ✓" not in run_row  # mean below the mean goal
    assert "100/200" in run_row  # the slowest seed per task
    paired = next(line for line in text.splitlines() if "minus source" in line)
    assert "-0.05 [-0.12, +0.02]" in paired and "-0.11 [-0.20, -0.02]" in paired
    lines = text.splitlines()
    at60 = lines[next(i for i, x in enumerate(lines) if "true labels" in x) + 1]
    assert "at 60 steps" in at60
    assert "0.50 [0.40, 0.60]" in at60 and "0.10 [0.00, 0.20]" in at60
    assert "minus the defaults" not in text
    (tmp_path / "migration_quality.json").unlink()  # a run without its file is left out
    assert "migrated: the defaults" not in report.migration_overview(tmp_path)
    assert report.migration_overview(tmp_path / "none") is None


def test_migration_overview_pairs_another_run_with_the_defaults(tmp_path, monkeypatch) -> None:
    """A run beside the defaults gets its difference on the same examples, over both runs'
    seeds, and a mean that meets the mean goal is marked."""
    ceilings = {"tasks": [{"task": "t", "source": {"acc": 0.5, "ci95": [0.4, 0.6]},
                           "true_labels": {"acc": 0.9, "ci95": [0.8, 1.0]}}]}  # fmt: skip

    def run(hits: list[list[bool]]) -> dict:
        accs = [sum(h) / len(h) for h in hits]
        return {"tasks": [{"task": "t", "modes": {"filtered": {
            "acc": sum(accs) / len(accs), "per_seed": accs, "seconds": [1.0] * len(hits),
            "runs": [{"hits": h} for h in hits]}}}]}  # fmt: skip

    (tmp_path / "migration_ceilings.json").write_text(json.dumps(ceilings))
    (tmp_path / "a.json").write_text(json.dumps(run([[True, False, False, False]] * 2)))
    (tmp_path / "b.json").write_text(json.dumps(run([[True, True, True, False],
                                                      [True, True, False, False]])))  # fmt: skip
    monkeypatch.setattr(report, "MIGRATION_RUNS", [("defaults", "a.json", "filtered"),
                                                   ("other", "b.json", "filtered")])  # fmt: skip
    lines = report.migration_overview(tmp_path).splitlines()
    other = next(i for i, x in enumerate(lines) if x.startswith("| other"))
    assert "| 0.625 ✓ |" in lines[other]  # 0.625 >= the goal 0.5
    versus = lines[other + 1]
    assert versus.startswith("| ↳ minus the defaults") and "+0.38 [" in versus
    assert next(x for x in lines if x.startswith("| defaults")).count("✓") == 0
