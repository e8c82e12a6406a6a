"""Batched multi-LoRA: every token carries its own adapter slot (-1 = base model only).

Tokens are grouped by adapter slot (a work list of token blocks, built on the device). Each
program computes with its slot's own rank: columns past it are masked, so a rank-8 adapter in
a rank-64 launch reads 8 rows of A and B, not 64. A rank can also be told per slice
(``live_ranks``): a slice the adapter does not target (rank 0 there, e.g. k of q/k/v for a q/v
adapter, or a whole module) is skipped by its programs before they read anything. A merge of
K adapters is served as one adapter (the "cat" merge: stacked factors of rank Σ r_k), so it
costs what one adapter of that rank costs.

Two paths, chosen per shape by :mod:`lora_kernels.configs`:

* fused: one program shrinks its token block over the whole hidden size, keeps
  ``t = x Aᵀ`` in registers and expands it into ``n_per_prog`` output columns
  (shrink is recomputed per column chunk; A comes from L2 after the first chunk);
* two-pass: shrink (optionally split over hidden with fp32 atomics) into an fp32 buffer
  ordered like the work list, then expand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lora_kernels.configs import KernelConfig, select_config
from lora_kernels.metadata import (
    SliceTable,
    WorkList,
    build_slice_table,
    build_work_list,
    cdiv,
)


@triton.jit
def _block_rows(work_ptr, sorted_ptr, w, BLOCK_M: tl.constexpr):
    """Slot, first sorted position and token ids of work item ``w`` (slot -1: nothing)."""
    slot = tl.load(work_ptr + 3 * w)
    start = tl.load(work_ptr + 3 * w + 1)
    length = tl.load(work_ptr + 3 * w + 2)
    offs = tl.arange(0, BLOCK_M)
    m_mask = offs < length
    rows = tl.load(sorted_ptr + start + offs, mask=m_mask, other=0)
    return slot, start, rows, m_mask


@triton.jit
def _slice_rank(slot, s, ranks_ptr, live_ptr, live_s0):
    """Rank of ``slot`` in slice ``s``: its adapter's rank, cut to the slice's live rows."""
    return tl.minimum(tl.load(ranks_ptr + slot), tl.load(live_ptr + s * live_s0 + slot))


@triton.jit
def _rank_columns(slot, rank, scales_ptr, R_BLOCK: tl.constexpr):
    """Per rank column (``R_BLOCK``): rank row, memory mask and coefficient of ``slot``.

    Memory is masked in runs of 8 columns (16-byte vectors); the coefficient zeroes the columns
    between the rank and its round-up, so finite padding there adds nothing.
    """
    r = tl.arange(0, R_BLOCK)
    rank8 = tl.multiple_of((rank + 7) // 8 * 8, 8)
    return r, r < rank8, tl.where(r < rank, tl.load(scales_ptr + slot), 0.0)


@triton.jit
def _shrink_tile(
    x_ptr, x_s0, rows, m_mask, a_ptr, a_s0, a_s1, slot, col_r, col_mask, k_lo, k_hi,
    BLOCK_M: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 ``x[rows, k_lo:k_hi] @ A[slot, :, k_lo:k_hi]ᵀ`` -> [BLOCK_M, R_BLOCK]."""
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * x_s0
    a_cols = a_ptr + slot.to(tl.int64) * a_s0 + col_r[None, :] * a_s1
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_hi
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_cols + kk[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(xt, at)
    return acc


@triton.jit
def _expand_chunk(
    t, y_ptr, y_s0, rows, m_mask, b_ptr, b_s0, b_s1, slot, col_r, col_mask, y_off, n_lo, n_hi,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``y[rows, y_off + n] += t @ B[slot, n, :]ᵀ`` for n in [n_lo, n_hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    y_rows = y_ptr + rows[:, None].to(tl.int64) * y_s0 + y_off
    b_cols = b_ptr + slot.to(tl.int64) * b_s0 + col_r[:, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        nn = n0 + offs_n
        n_mask = nn < n_hi
        bt = tl.load(
            b_cols + nn[None, :] * b_s1, mask=col_mask[:, None] & n_mask[None, :], other=0.0
        )
        delta = tl.dot(t, bt)
        ym = m_mask[:, None] & n_mask[None, :]
        yv = tl.load(y_rows + nn[None, :], mask=ym, other=0.0)
        tl.store(y_rows + nn[None, :], (yv.to(tl.float32) + delta).to(yv.dtype), mask=ym)


@triton.jit
def _multi_lora_fused_kernel(
    x_ptr, y_ptr, a_ptrs, b_ptrs, b_s0_ptr, slice_off_ptr, slice_n_ptr,
    work_ptr, sorted_ptr, ranks_ptr, live_ptr, scales_ptr,
    H, x_s0, y_s0, a_s0, a_s1, b_s1, live_s0,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, N_PER_PROG: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """grid = (work items, slices, ⌈max N_s / N_PER_PROG⌉)."""
    w = tl.program_id(0)
    s = tl.program_id(1)
    n_lo = tl.program_id(2) * N_PER_PROG
    slot, _, rows, m_mask = _block_rows(work_ptr, sorted_ptr, w, BLOCK_M)
    n_s = tl.multiple_of(tl.load(slice_n_ptr + s), ALIGN)
    if slot < 0 or n_lo >= n_s:
        return
    rank = _slice_rank(slot, s, ranks_ptr, live_ptr, live_s0)
    if rank <= 0:  # a slice the adapter does not target
        return
    dt = x_ptr.dtype.element_ty
    col_r, col_mask, coef = _rank_columns(slot, rank, scales_ptr, R_BLOCK)
    a_ptr = tl.multiple_of(tl.load(a_ptrs + s).to(tl.pointer_type(dt)), 16)
    acc = _shrink_tile(
        x_ptr, x_s0, rows, m_mask, a_ptr, a_s0, a_s1, slot, col_r, col_mask, 0, H,
        BLOCK_M, R_BLOCK, BLOCK_K,
    )  # fmt: skip
    t = (acc * coef[None, :]).to(dt)
    b_ptr = tl.multiple_of(tl.load(b_ptrs + s).to(tl.pointer_type(dt)), 16)
    n_hi = tl.minimum(n_lo + N_PER_PROG, n_s)
    b_s0 = tl.multiple_of(tl.load(b_s0_ptr + s), ALIGN)
    y_off = tl.multiple_of(tl.load(slice_off_ptr + s), ALIGN)
    _expand_chunk(
        t, y_ptr, y_s0, rows, m_mask, b_ptr, b_s0, b_s1, slot, col_r, col_mask, y_off,
        n_lo, n_hi, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, buf_ptr, a_ptrs, work_ptr, sorted_ptr, ranks_ptr, live_ptr, scales_ptr,
    H, k_per_split, x_s0, a_s0, a_s1, buf_s0, buf_s1, live_s0,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    """grid = (work items, slices, SPLIT_K); buf[s, sorted position, :] = coef · x Aᵀ."""
    w = tl.program_id(0)
    s = tl.program_id(1)
    k_lo = tl.program_id(2) * k_per_split
    slot, start, rows, m_mask = _block_rows(work_ptr, sorted_ptr, w, BLOCK_M)
    if slot < 0 or k_lo >= H:
        return
    rank = _slice_rank(slot, s, ranks_ptr, live_ptr, live_s0)
    if rank <= 0:  # a slice the adapter does not target: the expand skips it too
        return
    col_r, col_mask, coef = _rank_columns(slot, rank, scales_ptr, R_BLOCK)
    a_ptr = tl.multiple_of(tl.load(a_ptrs + s).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
    acc = _shrink_tile(
        x_ptr, x_s0, rows, m_mask, a_ptr, a_s0, a_s1, slot, col_r, col_mask,
        k_lo, tl.minimum(k_lo + k_per_split, H), BLOCK_M, R_BLOCK, BLOCK_K,
    )  # fmt: skip
    acc = acc * coef[None, :]
    pos = start + tl.arange(0, BLOCK_M)
    out = buf_ptr + s * buf_s0 + pos[:, None].to(tl.int64) * buf_s1 + col_r[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=m_mask[:, None])
    else:
        tl.atomic_add(out, acc, mask=m_mask[:, None], sem="relaxed")


@triton.jit
def _multi_lora_expand_kernel(
    y_ptr, buf_ptr, b_ptrs, b_s0_ptr, slice_off_ptr, slice_n_ptr,
    work_ptr, sorted_ptr, ranks_ptr, live_ptr, scales_ptr,
    y_s0, buf_s0, buf_s1, b_s1, live_s0,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_PER_PROG: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """grid = (work items, slices, ⌈max N_s / N_PER_PROG⌉); y += buf @ Bᵀ."""
    w = tl.program_id(0)
    s = tl.program_id(1)
    n_lo = tl.program_id(2) * N_PER_PROG
    slot, start, rows, m_mask = _block_rows(work_ptr, sorted_ptr, w, BLOCK_M)
    n_s = tl.multiple_of(tl.load(slice_n_ptr + s), ALIGN)
    if slot < 0 or n_lo >= n_s:
        return
    rank = _slice_rank(slot, s, ranks_ptr, live_ptr, live_s0)
    if rank <= 0:
        return
    dt = y_ptr.dtype.element_ty
    col_r, col_mask, _ = _rank_columns(slot, rank, scales_ptr, R_BLOCK)
    pos = start + tl.arange(0, BLOCK_M)
    src = buf_ptr + s * buf_s0 + pos[:, None].to(tl.int64) * buf_s1 + col_r[None, :]
    t = tl.load(src, mask=m_mask[:, None], other=0.0).to(dt)
    b_ptr = tl.multiple_of(tl.load(b_ptrs + s).to(tl.pointer_type(dt)), 16)
    n_hi = tl.minimum(n_lo + N_PER_PROG, n_s)
    b_s0 = tl.multiple_of(tl.load(b_s0_ptr + s), ALIGN)
    y_off = tl.multiple_of(tl.load(slice_off_ptr + s), ALIGN)
    _expand_chunk(
        t, y_ptr, y_s0, rows, m_mask, b_ptr, b_s0, b_s1, slot, col_r, col_mask, y_off,
        n_lo, n_hi, BLOCK_N,
    )  # fmt: skip


KERNELS = {
    "fused": (_multi_lora_fused_kernel,),
    "two_pass": (_multi_lora_shrink_kernel, _multi_lora_expand_kernel),
}


def r_block_for(rank: int) -> int:
    """Padded rank of a launch: a power of two, at least 16 (the fp16 tensor-core K)."""
    return max(16, triton.next_power_of_2(rank))


def launch(
    y: torch.Tensor,  # [T, N_y] updated in place
    x: torch.Tensor,  # [T, H]
    table: SliceTable,
    adapter_idx: torch.Tensor,  # [T] int, -1 = untouched
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] fp32
    max_rank: int,
    work: WorkList | None = None,
    config: KernelConfig | None = None,
    live_ranks: torch.Tensor | None = None,  # [slices, slots] int32; 0 = slice not targeted
) -> list:
    """Launch the kernels of one multi-LoRA application (see module doc).

    Returns what the launches return (compiled kernels on a GPU: the tuner reads their spills).
    """
    num_tokens = x.shape[0]
    assert x.ndim == 2 and y.ndim == 2 and y.shape[0] == num_tokens, (x.shape, y.shape)
    assert x.stride(1) == 1 and y.stride(1) == 1, "x and y must be contiguous in their last dim"
    assert x.shape[1] == table.hidden, f"x has {x.shape[1]} features, A has {table.hidden}"
    assert x.dtype == y.dtype == table.keepalive[0].dtype, "x, y and weights share one dtype"
    assert adapter_idx.shape == (num_tokens,), "one adapter index per token"
    assert ranks.shape == scales.shape == (table.num_slots,), "one rank and scale per slot"
    assert ranks.dtype == torch.int32 and scales.dtype == torch.float32
    assert y.shape[1] >= table.col_end, f"y has {y.shape[1]} columns, slices end at {table.col_end}"
    slices = table.a_ptrs.shape[0]
    if live_ranks is None:
        live, live_s0 = ranks, 0  # min(rank, rank): every slice at the slot's rank
    else:
        assert live_ranks.shape == (slices, table.num_slots), "a live rank per slice and slot"
        assert live_ranks.dtype == torch.int32 and live_ranks.is_contiguous()
        live, live_s0 = live_ranks, live_ranks.stride(0)
    if num_tokens == 0:
        return []
    r_block = r_block_for(min(max_rank, table.r_max))
    cfg = config or select_config(num_tokens, r_block)
    if work is None:
        work = build_work_list(adapter_idx, table.num_slots, cfg.block_m)
    assert work.block_m == cfg.block_m and work.num_tokens == num_tokens, "stale work list"
    common = dict(R_BLOCK=r_block, BLOCK_M=cfg.block_m)
    meta = (work.work, work.sorted_tokens, ranks, live, scales)
    warps = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_grid = cdiv(table.max_n, cfg.n_per_prog)
    if cfg.path == "fused":
        fused = _multi_lora_fused_kernel[(work.max_work, slices, n_grid)](
            x, y, table.a_ptrs, table.b_ptrs, table.b_stride0, table.offsets, table.sizes,
            *meta, table.hidden, x.stride(0), y.stride(0),
            table.a_stride0, table.a_stride1, table.b_stride1, live_s0,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, N_PER_PROG=cfg.n_per_prog,
            ALIGN=table.align, **common, **warps,
        )  # fmt: skip
        return [fused]
    alloc = torch.zeros if cfg.split_k > 1 else torch.empty
    buf = alloc((slices, num_tokens, r_block), dtype=torch.float32, device=x.device)
    k_per_split = cdiv(cdiv(table.hidden, cfg.split_k), cfg.block_k) * cfg.block_k
    shrink = _multi_lora_shrink_kernel[(work.max_work, slices, cfg.split_k)](
        x, buf, table.a_ptrs, *meta, table.hidden, k_per_split, x.stride(0),
        table.a_stride0, table.a_stride1, buf.stride(0), buf.stride(1), live_s0,
        BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, **common, **warps,
    )  # fmt: skip
    expand = _multi_lora_expand_kernel[(work.max_work, slices, n_grid)](
        y, buf, table.b_ptrs, table.b_stride0, table.offsets, table.sizes, *meta,
        y.stride(0), buf.stride(0), buf.stride(1), table.b_stride1, live_s0,
        BLOCK_N=cfg.block_n, N_PER_PROG=cfg.n_per_prog, ALIGN=table.align,
        **common, **warps,
    )  # fmt: skip
    return [shrink, expand]


def multi_lora(
    y: torch.Tensor,  # [T, N_y] updated in place; slice s writes columns off_s : off_s + N_s
    x: torch.Tensor,  # [T, H]
    lora_a: Sequence[torch.Tensor],  # per slice [slots, R_max, H]
    lora_b: Sequence[torch.Tensor],  # per slice [slots, N_s, R_max]
    adapter_idx: torch.Tensor,  # [T] int, -1 = base model only
    ranks: torch.Tensor,  # [slots] int32, rank_i <= R_max (rows past it are ignored)
    scales: torch.Tensor,  # [slots] fp32
    *,
    offset_start: int = 0,
    max_rank: int | None = None,  # host-known max rank in the batch; narrows R_BLOCK
    table: SliceTable | None = None,  # prebuilt by build_slice_table(lora_a, lora_b, offset)
    work: WorkList | None = None,  # prebuilt by build_work_list(adapter_idx, slots, block_m)
    config: KernelConfig | None = None,  # default: this device's configs for this shape
    live_ranks: torch.Tensor | None = None,  # [slices, slots] int32; 0 = slice not targeted
) -> None:
    """y[t, off_s:off_s+N_s] += scale[i] · (x[t] @ A_s[i, :r]ᵀ) @ B_s[i, :, :r]ᵀ, i = idx[t],
    r = min(r_i, live[s, i]).

    ``off_s = offset_start + Σ_{s'<s} N_s'``; tokens with ``idx[t] == -1`` are untouched, and
    so is slice ``s`` of a token whose adapter has ``live[s, i] == 0`` (its weights not read).
    """
    table = table or build_slice_table(lora_a, lora_b, offset_start)
    launch(y, x, table, adapter_idx, ranks, scales, max_rank or table.r_max, work=work,
           config=config, live_ranks=live_ranks)  # fmt: skip
