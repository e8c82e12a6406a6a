"""IterIS statistics: additive float64 sums per (adapter, layer-input key), serialisable.

For adapter i and one layer input, with ``X`` the rows the layer sees when base + adapter i runs
on task-i tokens and ``X̃`` the rows the *current merged* model sees on the same tokens:

- ``xtx = Σ xᵀx`` and ``tokens`` (any own-traffic rows; enough for IterIS's first iteration,
  where ``X̃ = X``);
- ``cross = Σ xᵀx̃``, ``merged = Σ x̃ᵀx̃`` and ``paired_tokens`` (rows seen by both models,
  aligned token by token; needed from the second iteration on).

Everything is a sum, so captures from several replicas or sessions add exactly (``a + b``).
Layers that share an input share a key (:func:`input_key`: q/k/v -> ``qkv_proj``,
gate/up -> ``gate_up_proj``, as vLLM fuses them), so their statistics are gathered once.
Files are safetensors with a format name and version in the metadata; writes are atomic.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from vllm_lora_ext.files import write_atomic

FORMAT = "vllm-lora-ext/iteris-stats"
VERSION = "1"
SHARED_INPUTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def input_key(module: str) -> str:
    """``base_model.model.model.layers.0.self_attn.k_proj`` -> ``model.layers.0.self_attn.qkv_proj``

    The PEFT prefix is dropped so keys equal vLLM's module names.
    """
    name = module.removeprefix("base_model.model.")
    parent, _, leaf = name.rpartition(".")
    for shared, leaves in SHARED_INPUTS.items():
        if leaf in leaves:
            return f"{parent}.{shared}" if parent else shared
    return name


def _add(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    if x is None or y is None:
        return y if x is None else x
    if x.shape != y.shape:
        raise ValueError(f"cannot add statistics of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return x + y


@dataclass
class InputStats:
    """Sums for one (adapter, input key); float64 [in, in] matrices."""

    xtx: torch.Tensor
    tokens: int
    cross: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    paired_tokens: int = 0

    def __add__(self, other: InputStats) -> InputStats:
        xtx = _add(self.xtx, other.xtx)
        assert xtx is not None
        return InputStats(
            xtx=xtx,
            tokens=self.tokens + other.tokens,
            cross=_add(self.cross, other.cross),
            merged=_add(self.merged, other.merged),
            paired_tokens=self.paired_tokens + other.paired_tokens,
        )


@dataclass
class IterisStats:
    """All adapters' :class:`InputStats`, keyed ``(adapter name, input key)``."""

    entries: dict[tuple[str, str], InputStats] = field(default_factory=dict)

    def add(
        self,
        adapter: str,
        key: str,
        x: torch.Tensor,  # [rows, in] inputs under base + adapter
        x_merged: torch.Tensor | None = None,  # [rows, in] same tokens under the merged model
    ) -> None:
        """Accumulate a batch of rows (in float64)."""
        x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        new = InputStats(xtx=x64.T @ x64, tokens=x64.shape[0])
        if x_merged is not None:
            if x_merged.shape != x.shape:
                raise ValueError(f"paired rows differ: {tuple(x.shape)} vs {tuple(x_merged.shape)}")
            xm = x_merged.reshape(-1, x.shape[-1]).to(torch.float64)
            new.cross, new.merged, new.paired_tokens = x64.T @ xm, xm.T @ xm, xm.shape[0]
        self.entries[(adapter, key)] = (
            self.entries[(adapter, key)] + new if (adapter, key) in self.entries else new
        )

    def merge(self, other: IterisStats) -> IterisStats:
        """A new set holding the sums of both (entries only in one are copied)."""
        out = dict(self.entries)
        for k, v in other.entries.items():
            out[k] = out[k] + v if k in out else v
        return IterisStats(out)

    __add__ = merge

    def get(self, adapter: str, key: str) -> InputStats:
        try:
            return self.entries[(adapter, key)]
        except KeyError:
            raise KeyError(f"no statistics for adapter {adapter!r} at input {key!r}") from None

    def tokens(self, adapter: str) -> int:
        """Rows summed for ``adapter`` (every layer input sees the same rows: the max)."""
        return max((s.tokens for (a, _), s in self.entries.items() if a == adapter), default=0)

    def layers(self, adapter: str) -> list[str]:
        return sorted(k for a, k in self.entries if a == adapter)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for s in self.entries.values()
            for t in (s.xtx, s.cross, s.merged)
            if t is not None
        )

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        index = []
        for i, ((adapter, key), s) in enumerate(sorted(self.entries.items())):
            index.append([adapter, key, s.tokens, s.paired_tokens])
            tensors[f"{i}.xtx"] = s.xtx.to(torch.float64).contiguous()
            for name in ("cross", "merged"):
                value = getattr(s, name)
                if value is not None:
                    tensors[f"{i}.{name}"] = value.to(torch.float64).contiguous()
        meta = {"format": FORMAT, "version": VERSION, "index": json.dumps(index)}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> IterisStats:
        """Parse :meth:`to_bytes` output; ValueError on anything else or another version."""
        meta = _checked_metadata(_header(data))
        try:
            tensors = load(data)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"unreadable statistics: {e}") from None
        entries = {}
        for i, (adapter, key, tokens, paired) in enumerate(json.loads(meta["index"])):
            xtx = tensors[f"{i}.xtx"]
            if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
                raise ValueError(f"{adapter} {key}: XᵀX must be square, got {tuple(xtx.shape)}")
            entries[(adapter, key)] = InputStats(
                xtx=xtx,
                tokens=int(tokens),
                cross=tensors.get(f"{i}.cross"),
                merged=tensors.get(f"{i}.merged"),
                paired_tokens=int(paired),
            )
        return cls(entries)

    def save(self, path: Path) -> None:
        """Atomic: written to a temporary file beside ``path``, then renamed over it."""
        write_atomic(Path(path), self.to_bytes())

    @staticmethod
    def summary(path: Path) -> StatsSummary:
        """Token counts, layers and size of a saved file, from its header alone (no tensors)."""
        with Path(path).open("rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            header = _header(head + f.read(n))
        meta = _checked_metadata(header)
        tokens: dict[str, int] = {}
        layers: dict[str, int] = {}
        for adapter, _key, count, _paired in json.loads(meta["index"]):
            tokens[adapter] = max(tokens.get(adapter, 0), int(count))
            layers[adapter] = layers.get(adapter, 0) + 1
        nbytes = sum(
            end - start
            for name, entry in header.items()
            if name != "__metadata__"
            for start, end in [entry["data_offsets"]]
        )
        return StatsSummary(tokens, layers, nbytes)

    @classmethod
    def load(cls, path: Path) -> IterisStats:
        """Read a file written by :meth:`save`; ValueError on another format or version."""
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


@dataclass(frozen=True)
class StatsSummary:
    tokens: dict[str, int]
    """Adapter -> rows summed (the max over its layer inputs)."""
    layers: dict[str, int]
    """Adapter -> layer inputs with statistics."""
    nbytes: int


def _header(data: bytes) -> dict:
    """The JSON header of safetensors bytes (at least the header's bytes must be given)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except Exception as e:  # struct and JSON each raise their own
        raise ValueError(f"unreadable statistics: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("unreadable statistics: the header is not a JSON object")
    return header


def _checked_metadata(header: dict) -> dict[str, str]:
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(f"statistics version {meta.get('version')!r}, this build reads {VERSION}")
    return meta
