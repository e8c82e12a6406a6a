"""What every benchmark result records about its run: commit, versions, arguments, machine."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "peft", "vllm", "triton")


def commit() -> str | None:
    """HEAD of this checkout, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


STARTED_AT = commit()
"""The checkout when the benchmark started: a long run's result is written after later commits
may have moved HEAD, and it must name the code it ran."""


def run_record(args: argparse.Namespace) -> dict:
    return {
        "commit": STARTED_AT,
        "versions": versions(),
        # Paths (also inside lists) as strings
        "args": json.loads(json.dumps(vars(args), default=str)),
        "machine": f"{platform.machine()}, {platform.system()}",
    }
