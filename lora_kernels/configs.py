"""Kernel configurations per shape bucket, read from ``configs.json`` beside this module.

The file is written by ``benchmarks/gpu_check.py --tune`` on the target GPU; each entry covers
the launches with ``R_BLOCK <= r_block`` and ``tokens <= max_tokens`` and
says which path (fused shrink+expand, or shrink to an fp32 buffer then expand) to take and
with which blocks. ``tests/unit/kernels/test_compile_hopper.py`` compiles every entry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

CONFIG_PATH = Path(__file__).with_name("configs.json")
KernelPath = Literal["fused", "two_pass"]


@dataclass(frozen=True)
class KernelConfig:
    path: KernelPath
    block_m: int  # tokens per program (rows of the work list)
    block_n: int  # output columns per expand step
    block_k: int  # hidden elements per shrink step
    n_per_prog: int  # output columns per program (a multiple of block_n)
    split_k: int  # two-pass shrink: programs sharing one hidden reduction (atomics if > 1)
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        assert self.path in ("fused", "two_pass"), self.path
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name}={v} must be a power of two >= 16"
        assert self.n_per_prog % self.block_n == 0, "n_per_prog must be a multiple of block_n"
        assert self.split_k >= 1 and self.num_warps in (1, 2, 4, 8, 16)

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class ConfigEntry:
    r_block: int  # largest padded rank served
    max_tokens: int
    config: KernelConfig


def _parse(raw: dict) -> list[ConfigEntry]:
    entries = []
    for e in raw["entries"]:
        e = dict(e)
        key = (e.pop("r_block"), e.pop("max_tokens"))
        entries.append(ConfigEntry(*key, KernelConfig(**e)))
    return sorted(entries, key=lambda e: (e.r_block, e.max_tokens))


def write_entries(
    entries: list[ConfigEntry], provenance: str, device: str | None, path: Path = CONFIG_PATH
) -> None:
    """One entry per line, so a re-tune shows up as a readable diff."""
    rows = []
    for e in sorted(entries, key=lambda e: (e.r_block, e.max_tokens)):
        keys = dict(r_block=e.r_block, max_tokens=e.max_tokens)
        rows.append("  " + json.dumps(keys | e.config.to_dict()))
    head = f'{{\n "provenance": {json.dumps(provenance)},\n "device": {json.dumps(device)},\n'
    path.write_text(head + ' "entries": [\n' + ",\n".join(rows) + "\n ]\n}\n")
    load_entries.cache_clear()


@lru_cache(maxsize=4)
def load_entries(path: Path = CONFIG_PATH) -> tuple[ConfigEntry, ...]:
    return tuple(_parse(json.loads(path.read_text())))


def select_config(num_tokens: int, r_block: int, path: Path = CONFIG_PATH) -> KernelConfig:
    """The smallest bucket covering the launch; past the largest token bucket, the largest."""
    fits = [e for e in load_entries(path) if e.r_block >= r_block]
    if not fits:
        raise ValueError(f"no kernel config covers R_BLOCK={r_block} in {path}")
    bucket = [e for e in fits if e.r_block == fits[0].r_block]
    for e in bucket:
        if e.max_tokens >= num_tokens:
            return e.config
    return bucket[-1].config
