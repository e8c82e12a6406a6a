"""The newest vLLM the ``gpu`` extra allows still has everything the boundary patches and calls.

The release is the highest one below the extra's upper bound (``vllm>=0.32,<0.34``: 0.33). Its
wheel is fetched once with ``pip download --no-deps`` into ``.cache/vllm-wheels/`` (ignored by
git) and its Python sources are read from the zip, never imported (it is a CUDA build): the
same :class:`~vllm_lora_ext.vllm_boundary.guards.Expect` table start-up checks on the installed
vLLM, every entry of it. Where the registry is unreachable the tests skip and say so.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest

from vllm_lora_ext import vllm_boundary
from vllm_lora_ext.vllm_boundary.entry import every_guard
from vllm_lora_ext.vllm_boundary.guards import check

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "vllm-wheels"
UNREACHABLE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
    r"ConnectTimeout|ReadTimeout|ProxyError|Max retries exceeded|Connection refused"
)


def gpu_extra() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^gpu = \["(vllm[^"]*)"\]', pyproject, re.MULTILINE)
    assert found, "pyproject.toml has no gpu extra"
    return found.group(1)


def newest_allowed() -> str:
    """``vllm>=0.32,<0.34`` -> ``0.33``: the release line just below the upper bound."""
    upper = re.search(r"<(\d+)\.(\d+)", gpu_extra())
    assert upper, f"the gpu extra {gpu_extra()!r} has no upper bound"
    return f"{upper.group(1)}.{int(upper.group(2)) - 1}"


@cache
def wheel(line: str) -> Path:
    """The cached wheel of the newest ``line`` release, downloaded if missing; skips when the
    registry cannot be reached."""
    pattern = f"vllm-{line}.*-*.whl"
    if not sorted(CACHE.glob(pattern)):
        CACHE.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--retries", "1", "--timeout", "30", "-d", str(CACHE), f"vllm=={line}.*"],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            output = run.stdout + run.stderr
            if UNREACHABLE.search(output):
                pytest.skip(f"the package registry is unreachable: {output.strip()[-300:]}")
            raise AssertionError(f"pip download vllm=={line}.* failed:\n{output[-2000:]}")
    return sorted(CACHE.glob(pattern))[-1]


def wheel_sources(path: Path):
    """module name -> its source, read from the wheel (None: not in it)."""
    archive = zipfile.ZipFile(path)
    names = set(archive.namelist())

    def source_of(module: str) -> str | None:
        stem = module.replace(".", "/")
        for name in (f"{stem}.py", f"{stem}/__init__.py"):
            if name in names:
                return archive.read(name).decode("utf-8")
        return None

    return source_of


def test_the_gpu_extra_spans_the_tested_and_the_next_release() -> None:
    assert gpu_extra() == "vllm>=0.32,<0.34"
    assert vllm_boundary.SUPPORTED_VLLM_VERSION.startswith("0.32.")
    assert newest_allowed() == "0.33"
    assert set(vllm_boundary.GUARDED_VLLM_LINES) == {"0.32", newest_allowed()}


def test_every_guard_holds_on_the_newest_allowed_vllm() -> None:
    path = wheel(newest_allowed())
    assert re.match(rf"vllm-{re.escape(newest_allowed())}\.\d+", path.name), path.name
    assert check(every_guard(), wheel_sources(path)) == []


def test_a_guard_fails_on_that_wheel_where_it_should() -> None:
    """The wheel is read, not merely opened: a symbol that was never there is reported."""
    from vllm_lora_ext.vllm_boundary.guards import Expect

    source_of = wheel_sources(wheel(newest_allowed()))
    assert "class LoRAModelManager" in (source_of("vllm.lora.model_manager") or "")
    gone = Expect("vllm.lora.model_manager", "LoRAModelManager.no_such_method", "a test")
    assert check([gone], source_of) == [
        "vllm.lora.model_manager.LoRAModelManager.no_such_method: not defined (a test)"
    ]


def test_the_benchmarks_can_vendor_the_newest_allowed_vllm_ops(tmp_path) -> None:
    """``benchmarks/vllm_lora_ops.py`` copies vLLM's Triton LoRA ops for the bare GPU host: it
    knows every vLLM import of that release's files (it fails loudly on an unknown one)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vllm_lora_ops import FILES, PACKAGE, vendor

    source_of = wheel_sources(wheel(newest_allowed()))
    source = tmp_path / "ops"
    source.mkdir()
    for name in FILES:
        text = source_of(f"vllm.lora.ops.triton_ops.{name.removesuffix('.py')}")
        assert text is not None, name
        (source / name).write_text(text)
    out = vendor(source, tmp_path / "vendor")
    assert out == tmp_path / "vendor" / PACKAGE
    for f in out.glob("*.py"):
        assert not re.search(r"^\s*(from|import) vllm\b", f.read_text(), re.MULTILINE), f
