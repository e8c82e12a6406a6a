"""The GPU check's dry run: the same code path as on the H200 (interpreter, tiny shapes), in a
process where importing vLLM or pydantic fails (the host has neither), with vLLM's ops copied
the way the GPU host gets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

from vllm_lora_ops import PACKAGE, vendor  # noqa: E402

NO_VLLM = """
import runpy, sys
sys.modules["vllm"] = None  # any `import vllm` now fails: the GPU host has none
sys.modules["pydantic"] = None  # nor pydantic
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_vendored_ops_import_nothing_from_vllm(tmp_path):
    out = vendor(dest=tmp_path)
    assert out == tmp_path / PACKAGE
    for f in out.glob("*.py"):
        assert "from vllm" not in f.read_text() and "import vllm" not in f.read_text(), f
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 1 << 20  # far within the 64 MiB that travel with a command


def test_dry_run_writes_every_part(tmp_path):
    vendor(dest=tmp_path / "vendor")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", NO_VLLM.format(script=script), "--dry-run", "--out", str(out),
         "--vendor", str(tmp_path / "vendor")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["env"]["dry_run"] is True and doc["env"]["commit"]
    assert doc["correctness"]["ok"], doc["correctness"]
    kernels = {(c["kernel"], c["tokens"]) for c in doc["correctness"]["cases"]}
    assert {k for k, _ in kernels} == {"multi_lora"} and len(kernels) >= 2
    skipped = {c["untargeted_slices_skipped"] for c in doc["correctness"]["cases"]}
    assert skipped == {False, True}, "untargeted slices are checked on the GPU too"
    assert all(c["repeat_identical"] and c["untouched_rows_bit_identical"]
               for c in doc["correctness"]["cases"])  # fmt: skip
    timing = doc["timing"]["cases"]
    assert timing and all(c["agrees_with_vllm"] for c in timing), timing
    assert all(c["ours_us"] > 0 and c["vllm_us"] > 0 and c["torch_us"] > 0 for c in timing)
    rank_exact = doc["rank_exact"]["cases"]
    assert rank_exact and all(c["own_rank_us"] > 0 and c["padded_rank_us"] > 0 for c in rank_exact)
    assert doc["graph"]["ok"], doc["graph"]
    assert doc["graph"]["cuda_graph"] is False  # the logic ran; the capture needs the GPU
    assert "correctness  ok=True" in run.stdout  # the table printed last


def test_the_tested_triton_is_the_pinned_one():
    import triton

    from lora_kernels.testing import TESTED_TRITON

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"triton=={TESTED_TRITON}"' in pyproject
    assert triton.__version__ == TESTED_TRITON
