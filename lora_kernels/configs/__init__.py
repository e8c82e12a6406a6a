"""Kernel configurations per device and shape bucket, in JSON files beside this module.

``<device>.json`` (the CUDA device name with spaces as ``_``, e.g. ``NVIDIA_H200.json``, as
vLLM names its tuned LoRA configs) is used on that device, ``default.json`` everywhere else. A
tuning run (``benchmarks/gpu_check.py --tune`` on the target GPU) writes its device's file and
never the default. Each entry covers the launches with ``R_BLOCK <= r_block`` and
``tokens <= max_tokens`` and says which path (fused shrink+expand, or shrink to an fp32 buffer
then expand) to take and with which blocks. ``tests/unit/kernels/test_compile_hopper.py``
compiles every entry of every file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

CONFIG_DIR = Path(__file__).parent
DEFAULT_PATH = CONFIG_DIR / "default.json"
KernelPath = Literal["fused", "two_pass"]


def device_file(device_name: str) -> Path:
    """Where the tuned configs of ``device_name`` (``torch.cuda.get_device_name()``) live."""
    return CONFIG_DIR / f"{device_name.strip().replace(' ', '_').replace('/', '_')}.json"


@cache
def _current_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


@lru_cache(maxsize=8)
def config_path(device_name: str | None = None) -> Path:
    """This device's file if a tuning run wrote one, else ``default.json`` (``device_name``:
    the current CUDA device's; none on CPU). Looked up once per process (the hot path)."""
    name = device_name or _current_device_name()
    if name is not None and device_file(name).is_file():
        return device_file(name)
    return DEFAULT_PATH


def every_config_file() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.json"))


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
    entries: list[ConfigEntry], provenance: str, device: str | None, path: Path
) -> None:
    """One entry per line, so a re-tune shows up as a readable diff; never the default."""
    assert path.resolve() != DEFAULT_PATH.resolve(), "a tuning run adds a file, not the seed"
    rows = []
    for e in sorted(entries, key=lambda e: (e.r_block, e.max_tokens)):
        keys = dict(r_block=e.r_block, max_tokens=e.max_tokens)
        rows.append("  " + json.dumps(keys | e.config.to_dict()))
    head = f'{{\n "provenance": {json.dumps(provenance)},\n "device": {json.dumps(device)},\n'
    path.write_text(head + ' "entries": [\n' + ",\n".join(rows) + "\n ]\n}\n")
    _load.cache_clear()
    config_path.cache_clear()


def load_entries(path: Path | None = None) -> tuple[ConfigEntry, ...]:
    """The entries of ``path`` (default: :func:`config_path`, this device's)."""
    return _load(path or config_path())


@lru_cache(maxsize=8)
def _load(path: Path) -> tuple[ConfigEntry, ...]:
    return tuple(_parse(json.loads(path.read_text())))


def select_config(num_tokens: int, r_block: int, path: Path | None = None) -> KernelConfig:
    """The smallest bucket covering the launch; past the largest token bucket, the largest."""
    path = path or config_path()
    fits = [e for e in load_entries(path) if e.r_block >= r_block]
    if not fits:
        raise ValueError(f"no kernel config covers R_BLOCK={r_block} in {path}")
    bucket = [e for e in fits if e.r_block == fits[0].r_block]
    for e in bucket:
        if e.max_tokens >= num_tokens:
            return e.config
    return bucket[-1].config
