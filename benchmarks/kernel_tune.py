"""``benchmarks/gpu_check.py --tune``: search block configs per configs bucket on this GPU.

For every bucket (r_block, max_tokens) the current config and ``n`` random candidates are
timed on the bucket's edge shapes (fewest and most tokens it serves; qkv and down
projections; min(T, 8) adapters). A candidate that fails
to build or spills registers is dropped. The winner minimises the geometric mean of its time
relative to the current config. The winners go to ``lora_kernels/configs/<device>.json`` (the
seed ``default.json`` is never overwritten; the device's file then serves that device), with
the device name as provenance; ``tests/unit/kernels/test_compile_hopper.py`` then checks the
new entries offline.

    python benchmarks/kernel_tune.py --quick    # the search on CPU: interpreter, tiny shapes

Timing needs the GPU, so run on its own this script only has ``--quick``: the same search for
the first bucket, 2 candidates, on tiny shapes and a few tokens, under the Triton interpreter
(wall time of one call stands in for the GPU timer: the path is checked, not the numbers). It
writes the tuned ``configs.json`` and ``kernel_tune.json`` (per bucket: old and new config,
score, candidates) to ``<tmp>/kernel_tune_quick/`` unless ``--out`` says otherwise, never into
``lora_kernels/configs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from lora_kernels.configs import (
    ConfigEntry,
    KernelConfig,
    device_file,
    load_entries,
    write_entries,
)
from lora_kernels.metadata import build_slice_table, build_work_list
from lora_kernels.testing import Problem, make_batch

# The GPU's token range; the quick run caps it (the interpreter pays per program).
TOKEN_CAP = 4096

SPACE = dict(
    path=("fused", "two_pass"), block_m=(16, 32, 64), block_n=(32, 64, 128),
    block_k=(32, 64, 128, 256), n_per_prog=(1, 2, 4, 8, 16), split_k=(1, 2, 4, 8),
    num_warps=(4, 8), num_stages=(2, 3),
)  # fmt: skip


def candidates(entry: ConfigEntry, n: int, rng: random.Random) -> list[KernelConfig]:
    """``n`` distinct random configs; block_m no larger than the bucket's tokens need."""
    max_bm = max(16, 1 << (min(entry.max_tokens, 64) - 1).bit_length())
    seen, out = {entry.config}, []
    for _ in range(50 * n):
        if len(out) == n:
            break
        pick = {k: rng.choice(v) for k, v in SPACE.items()}
        if pick["block_m"] > max_bm:
            continue
        pick["n_per_prog"] *= pick["block_n"]
        if pick["path"] == "fused":
            pick["split_k"] = 1
        cfg = KernelConfig(**pick)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def edge_tokens(entry: ConfigEntry, lower: int, cap: int = TOKEN_CAP) -> tuple[int, ...]:
    return tuple(sorted({max(1, lower), min(entry.max_tokens, cap)}))


def shape_runner(
    make_case: Callable[[str, int, int, int], Problem], op: str, tokens: int, entry: ConfigEntry
):
    """A function cfg -> (launch closure, compiled kernels) for one representative shape;
    ``make_case(op, tokens, active, rank)`` builds its problem (the kit's)."""
    from lora_kernels.multi_lora import launch  # after TRITON_INTERPRET is decided

    p = make_case(op, tokens, min(tokens, 8), entry.r_block)
    table, y = build_slice_table(p.lora_a, p.lora_b), p.fresh_y()

    def run(cfg: KernelConfig):
        work = build_work_list(p.idx, p.slots, cfg.block_m)
        return lambda: launch(
            y, p.x, table, p.idx, p.ranks, p.scales, entry.r_block, work=work, config=cfg
        )

    return run


def spills(fn: Callable[[], list]) -> bool:
    kernels = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return any(getattr(k, "n_spills", 0) > 0 for k in kernels)


def tune(
    timer,
    make_case: Callable,
    n: int,
    seed: int = 0,
    entries: Sequence[ConfigEntry] | None = None,
    path: Path | None = None,
    token_cap: int = TOKEN_CAP,
) -> list[dict]:
    """Search every bucket of ``entries`` (default: this device's configs), write the winners
    to ``path`` (default: ``lora_kernels/configs/<device>.json``); a record per bucket."""
    rng = random.Random(seed)
    entries = list(load_entries() if entries is None else entries)
    tuned, records = [], []
    lower = {}
    for e in entries:
        key = e.r_block
        shapes = [
            shape_runner(make_case, op, t, e)
            for op in ("qkv", "down")
            for t in edge_tokens(e, lower.get(key, 1), token_cap)
        ]
        lower[key] = e.max_tokens + 1
        base = [timer(run(e.config)) for run in shapes]
        best, best_score = e.config, 1.0
        t0 = time.time()
        tried, skipped, scored = 0, [], []
        for cfg in candidates(e, n, rng):
            tried += 1
            try:
                fns = [run(cfg) for run in shapes]
                if spills(fns[0]):
                    skipped.append({"config": cfg.to_dict(), "why": "spills"})
                    continue
                rel = [timer(fn) / b for fn, b in zip(fns, base, strict=True)]
            except Exception as exc:  # e.g. out of shared memory: not a candidate
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                skipped.append({"config": cfg.to_dict(), "why": type(exc).__name__})
                continue
            score = math.exp(sum(map(math.log, rel)) / len(rel))
            scored.append({"config": cfg.to_dict(), "score": score})
            if score < best_score:
                best, best_score = cfg, score
        took = time.time() - t0
        print(f"R={e.r_block} T<={e.max_tokens}: {best}", flush=True)
        print(f"  {best_score:.3f} of the old config's time; searched in {took:.0f} s", flush=True)
        tuned.append(replace(e, config=best))
        records.append(dict(
            r_block=e.r_block, max_tokens=e.max_tokens, old=e.config.to_dict(),
            best=best.to_dict(), score=best_score, old_us=base, candidates=tried,
            scored=scored, skipped=skipped, seconds=round(took, 2),
        ))  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    path = path or device_file(device)
    write_entries(tuned, f"tuned by `benchmarks/gpu_check.py --tune` ({n} candidates per bucket, "
                  f"seed {seed}) on {device}", device, path)  # fmt: skip
    return records


QUICK_SHAPES = {"qkv": (64, (32, 16, 16)), "down": (128, (64,))}
"""Tiny q/k/v and down projections (hidden, output slices) for the CPU run."""


def quick_case(op: str, tokens: int, active: int, rank: int) -> Problem:
    """A tiny served batch on the CPU, 8 slots (shape_runner spreads tokens over up to 8)."""
    hidden, sizes = QUICK_SHAPES[op]
    return make_batch(hidden, sizes, tokens, active, rank, slots=8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU: interpreter, tiny shapes, 1 bucket")
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder (default <tmp>/kernel_tune_quick)")
    args = p.parse_args(argv)
    if not args.quick:
        print("kernel_tune times kernels on a GPU: run `python benchmarks/gpu_check.py --tune "
              "--out DIR` there (or --quick: the search on CPU, interpreted)",
              file=sys.stderr)  # fmt: skip
        return 2
    # Before lora_kernels.multi_lora is imported: @triton.jit reads it when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quick
    from run_record import run_record

    out = args.out or quick.out_dir("kernel_tune")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def timer(fn: Callable[[], object]) -> float:  # as gpu_check's dry run: one call's wall time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6

    buckets = tune(timer, quick_case, args.candidates, args.seed, load_entries()[:1],
                   out / "configs.json", token_cap=8)  # fmt: skip
    doc = {
        "device": "cpu (Triton interpreter)",
        "configs": str(out / "configs.json"),
        "buckets": buckets,
        "seconds": round(time.perf_counter() - start, 1),
        "quick": True,
        "note": quick.NOTE,
        "run": run_record(args),
    }
    (out / "kernel_tune.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'kernel_tune.json'} and {out / 'configs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
