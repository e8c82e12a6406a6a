"""Per-batch metadata for the LoRA kernels: a compact work list and a per-slice weight table.

Both are built with plain torch ops on the tensors' own device and never read a value back to
the host, so they are safe inside CUDA graphs: the work list has a fixed length that depends
only on the number of tokens, the number of groups and the block size; unused entries say -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class WorkList:
    """Which (group, token-block) pairs have tokens; a kernel program takes one row.

    A *group* is an adapter slot: the tokens of one group share A and B.
    """

    work: torch.Tensor  # [max_work, 3] int32: (group or -1, start in sorted_tokens, length)
    sorted_tokens: torch.Tensor  # [num_tokens] int32: token ids ordered by group, -1s last
    block_m: int
    num_tokens: int

    @property
    def max_work(self) -> int:
        return self.work.shape[0]


def max_work_items(num_tokens: int, num_groups: int, block_m: int) -> int:
    """Upper bound of non-empty (group, block) pairs: Σ_g ⌈c_g/B⌉ ≤ ⌈T/B⌉ + min(G, T)."""
    return cdiv(num_tokens, block_m) + min(num_groups, num_tokens)


def build_work_list(group_idx: torch.Tensor, num_groups: int, block_m: int) -> WorkList:
    """Sort tokens by group and list the blocks that have tokens, without a host sync.

    vLLM launches every (slot, m-block) pair and lets empty ones exit; here a program exists
    only for blocks that hold tokens (plus a tail of at most ``min(G, T)`` -1 rows that exit
    at once), so sparse decode batches do not pay for ``max_loras * ⌈T/B⌉`` programs.
    """
    assert group_idx.ndim == 1 and num_groups >= 1 and block_m >= 1
    num_tokens = group_idx.numel()
    device = group_idx.device
    key = group_idx.to(torch.int64)
    key = torch.where(key < 0, torch.full_like(key, num_groups), key)
    sorted_tokens = torch.argsort(key, stable=True).to(torch.int32)
    # Not torch.bincount: its output size depends on the data, so on CUDA it reads the max back
    # to the host (a sync per call, and a capture error inside a CUDA graph).
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_groups]
    starts = torch.cumsum(counts, 0) - counts
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    w = torch.arange(max_work_items(num_tokens, num_groups, block_m), device=device)
    group = torch.searchsorted(block_end, w, right=True)
    valid = group < num_groups
    g = group.clamp(max=num_groups - 1)
    blk = w - (block_end[g] - blocks[g])
    start = starts[g] + blk * block_m
    length = (counts[g] - blk * block_m).clamp(min=0, max=block_m)
    group = torch.where(valid, g, torch.full_like(g, -1))
    work = torch.stack([group, start, length], dim=1).to(torch.int32).contiguous()
    return WorkList(work, sorted_tokens, block_m, num_tokens)


def live_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, slot: int) -> int:
    """How many leading rank rows of ``slot`` are live in one slice's stacks (vLLM's
    ``[slots, 1, R, H]`` and ``[slots, 1, N, R]``): past the last row whose A row and B column
    are both nonzero, nothing is added. 0: the adapter in the slot does not target the slice
    (vLLM leaves it at zero). Reads the device: call it when a slot is filled, not per step."""
    live = (lora_a[slot, 0].abs().amax(dim=1) > 0) & (lora_b[slot, 0].abs().amax(dim=0) > 0)
    rows = torch.nonzero(live)
    return int(rows[-1]) + 1 if len(rows) else 0


@dataclass(frozen=True)
class SliceTable:
    """Where each output slice's A and B live and where its columns go in ``y``.

    Slices (q/k/v, gate/up) keep separate stacked tensors, as vLLM stores them, so the kernels
    read them through a table of data pointers. Build it once per set of weight tensors.
    """

    a_ptrs: torch.Tensor  # [S] int64 data pointers of A_s [slots, R_max, H]
    b_ptrs: torch.Tensor  # [S] int64 data pointers of B_s [slots, N_s, R_max]
    b_stride0: torch.Tensor  # [S] int64 slot stride of each B_s
    offsets: torch.Tensor  # [S] int32 first column of slice s in y
    sizes: torch.Tensor  # [S] int32 N_s
    a_stride0: int
    a_stride1: int
    b_stride1: int
    r_max: int
    hidden: int
    max_n: int
    total_n: int
    col_end: int  # offset_start + Σ N_s
    align: int  # 16 when every N_s, offset and B slot stride is a multiple of 16, else 1
    num_slots: int
    keepalive: tuple[torch.Tensor, ...]


def _squeeze_layer_dim(w: torch.Tensor) -> torch.Tensor:
    # vLLM stacks weights as [slots, 1, rows, cols]; the kernels take [slots, rows, cols].
    if w.ndim == 4:
        assert w.shape[1] == 1, f"unexpected weight shape {tuple(w.shape)}"
        w = w[:, 0]
    assert w.ndim == 3, f"unexpected weight shape {tuple(w.shape)}"
    assert w.stride(-1) == 1, "weights must be contiguous in their last dim"
    return w


def build_slice_table(
    lora_a: Sequence[torch.Tensor],  # per slice [slots, R_max, H] (or [slots, 1, R_max, H])
    lora_b: Sequence[torch.Tensor],  # per slice [slots, N_s, R_max] (or [slots, 1, N_s, R_max])
    offset_start: int = 0,
) -> SliceTable:
    assert len(lora_a) == len(lora_b) >= 1, "one A and one B per slice"
    a = [_squeeze_layer_dim(t) for t in lora_a]
    b = [_squeeze_layer_dim(t) for t in lora_b]
    slots, r_max, hidden = a[0].shape
    dtype, device = a[0].dtype, a[0].device
    for t in a:
        assert t.shape == a[0].shape and t.stride() == a[0].stride(), "A slices must match"
    for t in b:
        assert t.shape[0] == slots and t.shape[2] == r_max, "B slices: [slots, N_s, R_max]"
        assert t.stride(1) == b[0].stride(1), "B slices must share their row stride"
    assert all(t.dtype == dtype and t.device == device for t in (*a, *b))
    assert all(t.data_ptr() % 16 == 0 for t in (*a, *b)), "kernels assume 16-byte aligned stacks"
    sizes = [t.shape[1] for t in b]
    b_strides = [t.stride(0) for t in b]
    offsets = [offset_start + sum(sizes[:i]) for i in range(len(sizes))]

    def ints(values: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dt).to(device, non_blocking=True)

    return SliceTable(
        a_ptrs=ints([t.data_ptr() for t in a], torch.int64),
        b_ptrs=ints([t.data_ptr() for t in b], torch.int64),
        b_stride0=ints(b_strides, torch.int64),
        offsets=ints(offsets, torch.int32),
        sizes=ints(sizes, torch.int32),
        a_stride0=a[0].stride(0),
        a_stride1=a[0].stride(1),
        b_stride1=b[0].stride(1),
        r_max=r_max,
        hidden=hidden,
        max_n=max(sizes),
        total_n=sum(sizes),
        col_end=offset_start + sum(sizes),
        align=16 if all(v % 16 == 0 for v in (*sizes, *offsets, *b_strides)) else 1,
        num_slots=slots,
        keepalive=(*a, *b),
    )
