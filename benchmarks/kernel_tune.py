"""``benchmarks/gpu_check.py --tune``: search block configs per configs.json bucket on this GPU.

For every bucket (r_block, max_tokens) the current config and ``n`` random candidates are
timed on the bucket's edge shapes (fewest and most tokens it serves; qkv and down
projections; min(T, 8) adapters). A candidate that fails
to build or spills registers is dropped. The winner minimises the geometric mean of its time
relative to the current config. The file is rewritten with the device name as provenance;
``tests/unit/kernels/test_compile_hopper.py`` then checks the new entries offline.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from lora_kernels.configs import ConfigEntry, KernelConfig, load_entries, write_entries
from lora_kernels.metadata import build_slice_table, build_work_list
from lora_kernels.multi_lora import launch

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


def edge_tokens(entry: ConfigEntry, lower: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, lower), min(entry.max_tokens, 4096)}))


def shape_runner(make_case: Callable, op: str, tokens: int, entry: ConfigEntry):
    """A function cfg -> (launch closure, compiled kernels) for one representative shape."""
    active = min(tokens, 8)
    c = make_case(op, tokens, active, entry.r_block)
    table, dev = build_slice_table(c["a"], c["b"]), c["x"].device
    slots = c["a"][0].shape[0]
    ranks = torch.full((slots,), entry.r_block, dtype=torch.int32, device=dev)
    scales = torch.ones(slots, device=dev)

    def run(cfg: KernelConfig):
        work = build_work_list(c["idx"], slots, cfg.block_m)
        return lambda: launch(
            c["y"], c["x"], table, c["idx"], ranks, scales, entry.r_block, work=work, config=cfg
        )

    return run


def spills(fn: Callable[[], list]) -> bool:
    kernels = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return any(getattr(k, "n_spills", 0) > 0 for k in kernels)


def tune(timer, make_case: Callable, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    entries = list(load_entries())
    tuned = []
    lower = {}
    for e in entries:
        key = e.r_block
        shapes = [
            shape_runner(make_case, op, t, e)
            for op in ("qkv", "down")
            for t in edge_tokens(e, lower.get(key, 1))
        ]
        lower[key] = e.max_tokens + 1
        base = [timer(run(e.config)) for run in shapes]
        best, best_score = e.config, 1.0
        t0 = time.time()
        for cfg in candidates(e, n, rng):
            try:
                fns = [run(cfg) for run in shapes]
                if spills(fns[0]):
                    continue
                rel = [timer(fn) / b for fn, b in zip(fns, base, strict=True)]
            except Exception as exc:  # e.g. out of shared memory: not a candidate
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                continue
            score = math.exp(sum(map(math.log, rel)) / len(rel))
            if score < best_score:
                best, best_score = cfg, score
        took = time.time() - t0
        print(f"R={e.r_block} T<={e.max_tokens}: {best}", flush=True)
        print(f"  {best_score:.3f} of the old config's time; searched in {took:.0f} s", flush=True)
        tuned.append(replace(e, config=best))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    write_entries(tuned, f"tuned by `benchmarks/gpu_check.py --tune` ({n} candidates per bucket, "
                  f"seed {seed}) on {device}", device)  # fmt: skip
