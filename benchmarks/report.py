"""Render benchmarks/results/adapters.json as a Markdown table and a PNG bar chart.

python benchmarks/report.py   # prints the table; writes benchmarks/results/adapters.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table(report: dict) -> str:
    lines = [
        "| task | scoring | held-out n | base acc (95% CI) | adapter acc (95% CI) | gain "
        "| train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["adapters"]:
        b, a = r["base_ci95"], r["adapter_ci95"]
        lines.append(
            f"| {r['task']} | {r['mode']} | {r['n_heldout']} "
            f"| {r['base_acc']:.3f} ({b[0]:.2f}-{b[1]:.2f}) "
            f"| {r['adapter_acc']:.3f} ({a[0]:.2f}-{a[1]:.2f}) "
            f"| {100 * (r['adapter_acc'] - r['base_acc']):+.1f} pt | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["adapters"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([x - 0.2 for x in xs], [r["base_acc"] for r in rows], 0.4, label=report["base"])
    ax.bar([x + 0.2 for x in xs], [r["adapter_acc"] for r in rows], 0.4, label="+ task adapter")
    ax.set_xticks(list(xs), [r["task"] for r in rows], fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(report["evaluated_with"], fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    report = json.loads((RESULTS / "adapters.json").read_text())
    print(table(report))
    plot(report, RESULTS / "adapters.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
