"""Every kernel of every entry of every configs file builds for sm_90 and sm_80, none spills.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (this test session has it set,
which turns ``@triton.jit`` into the interpreter). It uses the Triton wheel's ptxas and
cuobjdump; no GPU is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kernels.configs import every_config_file, load_entries
from lora_kernels.multi_lora import KERNELS

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "kernel_compile_report.py"


def compile_report(out_dir: Path, configs: Path | None = None) -> dict:
    out = out_dir / "kernel_compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(SCRIPT), "--out", str(out)]
    if configs is not None:
        args += ["--configs", str(configs)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def problems(report: dict) -> list[str]:
    failures = []
    for r in report["rows"]:
        where = f"{r['kernel']} {r['arch']} R={r['r_block']} T<={r['max_tokens']}"
        if not r["built"]:
            failures.append(f"{where}: does not build: {r['error']}")
            continue
        if r["spills"]:
            failures.append(f"{where}: spills ({r['stack_bytes']} B stack)")
        smem = r["dynamic_shared_bytes"] + r["static_shared_bytes"]
        limit = 227 * 1024 if r["arch"] == "sm_90" else 163 * 1024
        if smem > limit:
            failures.append(f"{where}: {smem} B shared memory > {limit}")
        if not 0 < r["registers"] <= 255:
            failures.append(f"{where}: {r['registers']} registers")
    return failures


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compile_report(tmp_path_factory.mktemp("compile"))


def test_every_entry_kernel_and_arch_was_compiled(report):
    expected = {
        (path.name, k.__name__, arch, e.r_block, e.max_tokens)
        for path in every_config_file()
        for e in load_entries(path)
        for k in KERNELS[e.config.path]
        for arch in ("sm_90", "sm_80")
    }
    assert "default.json" in {p.name for p in every_config_file()}
    got = {
        (r["configs"], r["kernel"], r["arch"], r["r_block"], r["max_tokens"])
        for r in report["rows"]
    }
    assert got == expected


def test_all_build_without_spills_within_hardware_limits(report):
    failures = problems(report)
    assert not failures, "\n".join(failures)


def test_an_oversized_config_is_caught(tmp_path):
    """The check can fail: a 128-token block over a rank-128 tile spills on sm_90."""
    bad = dict(
        r_block=128, max_tokens=64, path="fused", block_m=128, block_n=128,
        block_k=64, n_per_prog=256, split_k=1, num_warps=4, num_stages=2,
    )  # fmt: skip
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps({"provenance": "test", "device": None, "entries": [bad]}))
    failures = problems(compile_report(tmp_path, configs))
    assert any("sm_90" in f and "spills" in f for f in failures), failures
