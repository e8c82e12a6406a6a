"""Grouped LoRA shrink/expand on plain tensors: one dense matmul per adapter, no weight copies.

vLLM's CPU ops gather a copy of the LoRA weights for every token (``lora_a[indices]``) and
einsum over it; in prefill that is ``tokens x rank x hidden`` floats per layer and slice. Here
the tokens of one adapter are found once per batch (:func:`group_tokens`) and every layer does
``x[rows] @ A[slot].T`` and ``buf[rows] @ B[slot].T`` on the adapter's own weights.

Weights use vLLM's stacked layout: ``lora_a[slot, 0]`` is ``[rank, in]``, ``lora_b[slot, 0]`` is
``[out, rank]``. Index -1 means "no adapter": those rows are left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Rows = slice | torch.Tensor


@dataclass(frozen=True)
class TokenGroups:
    """``(slot, rows)`` per adapter present in the batch; rows a slice when contiguous."""

    groups: tuple[tuple[int, Rows], ...]
    num_tokens: int

    @property
    def empty(self) -> bool:
        return not self.groups


def group_tokens(indices: torch.Tensor) -> TokenGroups:
    """Group token positions by adapter slot, skipping -1. Runs once per batch, not per layer."""
    idx = indices.tolist()
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for pos in range(1, len(idx) + 1):
        if pos == len(idx) or idx[pos] != idx[start]:
            if idx[start] >= 0:
                runs.setdefault(idx[start], []).append((start, pos))
            start = pos
    groups: list[tuple[int, Rows]] = []
    for slot, spans in runs.items():
        if len(spans) == 1:
            groups.append((slot, slice(*spans[0])))
        else:
            rows = torch.cat([torch.arange(a, b) for a, b in spans])
            groups.append((slot, rows))
    return TokenGroups(tuple(groups), len(idx))


def shrink(
    buffers: torch.Tensor | Sequence[torch.Tensor],  # n_slices x [num_tokens, rank]
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, rank, in]
    scale: float,
    groups: TokenGroups,
) -> None:
    """``buf[s][t] = scale * x[t] @ A_s[i].T`` for ``i = idx[t] >= 0``; other rows untouched.

    Computed in the buffer's dtype (float32 in vLLM), as vLLM's ops do.
    """
    for s, a in enumerate(lora_a):
        buf = buffers[s]
        for slot, rows in groups.groups:
            xa = torch.mm(x[rows].to(buf.dtype), a[slot, 0].to(buf.dtype).t())
            buf[rows] = xa * scale if scale != 1.0 else xa


def expand(
    y: torch.Tensor,  # [num_tokens, sum(output_slices)]
    buffers: torch.Tensor | Sequence[torch.Tensor],  # n_slices x [num_tokens, rank]
    lora_b: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, out_s, rank]
    output_slices: Sequence[int],
    groups: TokenGroups,
    offset_start: int = 0,
    add_inputs: bool = True,
) -> None:
    """``y[t, off_s:off_s+out_s] (+)= buf[s][t] @ B_s[i].T`` for ``i = idx[t] >= 0``."""
    offset = offset_start
    for s, (b, size) in enumerate(zip(lora_b, output_slices, strict=True)):
        buf = buffers[s]
        for slot, rows in groups.groups:
            out = torch.mm(buf[rows].to(y.dtype), b[slot, 0, :size].to(y.dtype).t())
            if add_inputs:
                y[rows, offset : offset + size] += out
            else:
                y[rows, offset : offset + size] = out
        offset += size


def lora_linear(
    y: torch.Tensor,  # [num_tokens, sum(output_slices)]
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, rank, in]
    lora_b: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, out_s, rank]
    scale: float,
    output_slices: Sequence[int],
    groups: TokenGroups,
) -> None:
    """``y[t, slice s] += scale * (x[t] @ A_s[i].T) @ B_s[i].T`` for ``i = idx[t] >= 0``.

    Fuses shrink and expand per group so the rank-sized intermediate never leaves the cache.
    """
    offset = 0
    for a, b, size in zip(lora_a, lora_b, output_slices, strict=True):
        for slot, rows in groups.groups:
            xa = torch.mm(x[rows].to(torch.float32), a[slot, 0].to(torch.float32).t())
            if scale != 1.0:
                xa = xa * scale
            out = torch.mm(xa.to(y.dtype), b[slot, 0, :size].to(y.dtype).t())
            y[rows, offset : offset + size] += out
        offset += size
