"""Compile every kernel of every ``lora_kernels/configs/*.json`` entry for sm_90 and sm_80, offline.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs ptxas
from the Triton wheel, and the wheel's ``cuobjdump --dump-resource-usage`` reads registers,
stack (spills) and static shared memory from the cubin; Triton's dynamic shared memory comes
from the kernel metadata. Must run *without* ``TRITON_INTERPRET`` (the interpreter would hand
back Python functions instead of JIT kernels).

    python benchmarks/kernel_compile_report.py   # -> benchmarks/results/kernel_compile.json
    python benchmarks/kernel_compile_report.py --quick  # the first entry, sm_90 only -> <tmp>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import quick  # noqa: E402
import triton  # noqa: E402
from run_record import run_record  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_kernels.configs import ConfigEntry, every_config_file, load_entries  # noqa: E402
from lora_kernels.multi_lora import KERNELS  # noqa: E402

ARCHS = (90, 80)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Element types of the pointer arguments at serving time (fp16 shown; bf16 compiles alike).
POINTERS = {
    "x_ptr": "*fp16", "y_ptr": "*fp16", "buf_ptr": "*fp32",
    "scales_ptr": "*fp32", "a_ptrs": "*i64", "b_ptrs": "*i64", "b_s0_ptr": "*i64",
}  # fmt: skip
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def constexprs(entry: ConfigEntry, kernel: triton.JITFunction) -> dict[str, object]:
    """The launch's constexprs at the bucket's upper bounds (its worst case for registers)."""
    c = entry.config
    every = dict(
        R_BLOCK=entry.r_block, BLOCK_M=c.block_m,
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, N_PER_PROG=c.n_per_prog, SPLIT_K=c.split_k,
        ALIGN=16,
    )  # fmt: skip
    return {k: v for k, v in every.items() if k in kernel.arg_names}


def compile_one(kernel: triton.JITFunction, consts: dict, arch: int, warps: int, stages: int):
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        is_ptr = name.endswith(("_ptr", "_ptrs"))
        signature[name] = POINTERS.get(name, "*i32") if is_ptr else "i32"
        # Serving shapes (hidden 4096, rank >= 16, 16-byte aligned tensors): all divisible by 16.
        attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, consts, attrs)
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    m = RESOURCE.search(out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local)


def report(
    config_paths: list[Path], entries: int | None = None, archs: tuple[int, ...] = ARCHS
) -> list[dict]:
    """A row per file, kernel, entry and arch; ``entries``: the first so many of each file."""
    rows = []
    every = [(path, entry) for path in config_paths for entry in load_entries(path)[:entries]]
    for path, entry in every:
        c = entry.config
        for kernel in KERNELS[c.path]:
            consts = constexprs(entry, kernel)
            for arch in archs:
                t0 = time.perf_counter()
                row = dict(
                    kernel=kernel.__name__, arch=f"sm_{arch}", configs=path.name,
                    r_block=entry.r_block, max_tokens=entry.max_tokens, **c.to_dict(),
                )  # fmt: skip
                try:
                    ck = compile_one(kernel, consts, arch, c.num_warps, c.num_stages)
                except Exception as e:  # a config that does not build is a finding, not a crash
                    row.update(built=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                    rows.append(row)
                    continue
                usage = resource_usage(ck.asm["cubin"])
                row.update(built=True, **usage, dynamic_shared_bytes=ck.metadata.shared)
                row["spills"] = usage["stack_bytes"] > 0 or usage["local_bytes"] > 0
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'kernel':26} {'arch':6} {'R':>4} {'tok<=':>7} {'path':8} "
    head += f"{'bm/bn/bk/npp/sk/w/s':22} {'reg':>4} {'smem':>7} {'spill':>5}"
    lines = [head]
    for r in rows:
        blocks = "/".join(
            str(r[k])
            for k in ("block_m", "block_n", "block_k", "n_per_prog", "split_k", "num_warps")
        )
        blocks += f"/{r['num_stages']}"
        tail = (
            f"{r['registers']:>4} {r['dynamic_shared_bytes'] + r['static_shared_bytes']:>7} "
            f"{'YES' if r['spills'] else 'no':>5}"
            if r["built"]
            else f"BUILD FAILED: {r['error'][:60]}"
        )
        tok = "inf" if r["max_tokens"] >= 1 << 20 else str(r["max_tokens"])
        lines.append(
            f"{r['kernel'][1:-7]:26} {r['arch']:6} {r['r_block']:>4} {tok:>7} "
            f"{r['path']:8} {blocks:22} {tail}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, action="append",
                        help="a configs file (repeatable; default: every file of lora_kernels/"
                        "configs/)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernel_compile.json")
    parser.add_argument("--quick", action="store_true", help="the first entry, for sm_90 only")
    args = parser.parse_args(argv)
    if args.quick and args.out == parser.get_default("out"):  # never the committed run
        args.out = quick.out_dir("kernel_compile_report") / "kernel_compile.json"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    args.configs = args.configs or every_config_file()
    rows = report(args.configs, 1, ARCHS[:1]) if args.quick else report(args.configs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "triton": triton.__version__,
        "configs": [p.name for p in args.configs],
        "dtype": "fp16",
        "rows": rows,
        "quick": args.quick,
        "run": run_record(args),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
