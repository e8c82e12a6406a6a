"""Additive layer-input statistics of one adapter: ``XᵀX`` (float64) and a token count per layer.

Sums, not means, so captures from several replicas (or several capture sessions) add up
exactly; the export format is safetensors with a format/version in its metadata.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

FORMAT = "vllm-lora-ext/layer-stats"
VERSION = "1"
_TOKENS = "#tokens"


@dataclass
class LayerStats:
    gram: dict[str, torch.Tensor]
    """vLLM layer name (its input key) -> float64 ``XᵀX`` [in, in]."""
    counts: dict[str, int]
    """vLLM layer name -> rows summed into its gram."""

    @property
    def layers(self) -> list[str]:
        return sorted(self.gram)

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gram.values())

    def __add__(self, other: LayerStats) -> LayerStats:
        gram = dict(self.gram)
        counts = dict(self.counts)
        for key, value in other.gram.items():
            if key in gram:
                if gram[key].shape != value.shape:
                    raise ValueError(
                        f"layer {key}: {tuple(gram[key].shape)} vs {tuple(value.shape)}"
                    )
                gram[key] = gram[key] + value
            else:
                gram[key] = value
            counts[key] = counts.get(key, 0) + other.counts[key]
        return LayerStats(gram, counts)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.to(torch.float64).contiguous() for k, v in self.gram.items()}
        tensors |= {k + _TOKENS: torch.tensor(n, dtype=torch.int64) for k, n in self.counts.items()}
        return tensors

    def to_bytes(self) -> bytes:
        return save(self.to_tensors(), metadata={"format": FORMAT, "version": VERSION})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LayerStats:
        gram = {k: v.to(torch.float64) for k, v in tensors.items() if not k.endswith(_TOKENS)}
        counts = {
            k.removesuffix(_TOKENS): int(v) for k, v in tensors.items() if k.endswith(_TOKENS)
        }
        if set(gram) != set(counts):
            raise ValueError("every layer needs both its gram and its token count")
        for key, g in gram.items():
            if g.ndim != 2 or g.shape[0] != g.shape[1]:
                raise ValueError(f"layer {key}: gram must be square, got {tuple(g.shape)}")
        return cls(gram, counts)

    @classmethod
    def from_bytes(cls, data: bytes) -> LayerStats:
        try:
            tensors = load(data)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"unreadable safetensors: {e}") from e
        _check_metadata(_metadata_of_bytes(data))
        return cls.from_tensors(tensors)

    def save(self, path: Path) -> None:
        """Atomic: a temporary file in the same directory, then a rename."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.to_bytes())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> LayerStats:
        with safe_open(str(path), framework="pt") as f:
            _check_metadata(f.metadata() or {})
            return cls.from_tensors({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118


def _metadata_of_bytes(data: bytes) -> dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def _check_metadata(meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(f"statistics version {meta.get('version')!r}, this build reads {VERSION}")
