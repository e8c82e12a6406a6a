"""Grouped LoRA shrink/expand on plain tensors: one dense matmul per adapter, no weight copies.

vLLM's CPU ops gather a copy of the LoRA weights for every token (``lora_a[indices]``) and
einsum over it; in prefill that is ``tokens x rank x hidden`` floats per layer and slice. Here
the tokens of one adapter are found once per batch (:func:`group_tokens`) and every layer does
``x[rows] @ A[slot].T`` and ``buf[rows] @ B[slot].T`` on the adapter's own weights.

Weights use vLLM's stacked layout: ``lora_a[slot, 0]`` is ``[rank, in]``, ``lora_b[slot, 0]`` is
``[out, rank]``. Index -1 means "no adapter": those rows are left untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_kernels.metadata import live_rank

GATHER_MIN_GROUPS = 4
GATHER_TOKENS_PER_GROUP = 4
GATHER_MAX_BYTES = 32 << 20  # per module slice: larger copies go the grouped way


@dataclass(frozen=True)
class TokenGroups:
    """The batch's tokens grouped by adapter slot, found once per batch.

    ``segments`` are ``(slot, rows)`` with ``rows`` a slice. Without ``perm`` the slices index
    the batch directly (each adapter's tokens are contiguous, as in prefill). With ``perm`` they
    index ``perm``: the positions of all adapter tokens, sorted by slot (interleaved decode).
    """

    segments: tuple[tuple[int, slice], ...]
    perm: torch.Tensor | None
    num_tokens: int

    @property
    def empty(self) -> bool:
        return not self.segments

    @functools.cached_property
    def row_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch positions, slot) of every adapter token in grouped order, for the gathered
        path; computed once per batch, on first use."""
        if self.perm is not None:
            positions = self.perm
        else:
            positions = torch.cat([torch.arange(r.start, r.stop) for _, r in self.segments])
        sizes = torch.tensor([r.stop - r.start for _, r in self.segments])
        slots = torch.repeat_interleave(torch.tensor([s for s, _ in self.segments]), sizes)
        return positions, slots

    @property
    def many_small(self) -> bool:
        """Many adapters with few tokens each (decode of a mixed batch): one gathered batched
        matmul per module beats one small matmul per adapter, each a few µs of dispatch."""
        n = len(self.segments)
        return n >= GATHER_MIN_GROUPS and self.adapter_tokens <= GATHER_TOKENS_PER_GROUP * n

    @functools.cached_property
    def adapter_tokens(self) -> int:
        return sum(r.stop - r.start for _, r in self.segments)


def group_tokens(indices: torch.Tensor) -> TokenGroups:
    """Group token positions by adapter slot, skipping -1 (no adapter)."""
    idx = indices.tolist()
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for pos in range(1, len(idx) + 1):
        if pos == len(idx) or idx[pos] != idx[start]:
            if idx[start] >= 0:
                runs.setdefault(idx[start], []).append((start, pos))
            start = pos
    if all(len(spans) == 1 for spans in runs.values()):
        segments = tuple((slot, slice(*spans[0])) for slot, spans in runs.items())
        return TokenGroups(segments, None, len(idx))
    order: list[int] = []
    segments_list = []
    for slot, spans in runs.items():
        first = len(order)
        for a, b in spans:
            order.extend(range(a, b))
        segments_list.append((slot, slice(first, len(order))))
    return TokenGroups(tuple(segments_list), torch.tensor(order), len(idx))


def note_live_ranks(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slot: int
) -> None:
    """Record on each slice's stacked tensors how many leading rank rows of ``slot`` are live.

    A slot holds ``max_rank`` rows for every module; an adapter of rank ``r`` fills ``r`` of
    them and leaves the modules it does not target at zero. Row ``k`` adds
    ``(x · A[k]) · B[:, k]``, nothing when ``A[k]`` or ``B[:, k]`` is zero, so computing only
    up to the last live row is exact. Read by the ops below (``_live_rank``); a tensor never
    noted is used whole.
    """
    for a, b in zip(lora_a, lora_b, strict=True):
        if a.dim() != 4 or b.dim() != 4 or a.shape[2] != b.shape[3]:
            continue
        rank = live_rank(a, b, slot)
        ranks = getattr(a, "_lora_ext_live_ranks", None)
        if ranks is None:
            ranks = [a.shape[2]] * a.shape[0]
            a._lora_ext_live_ranks = ranks  # type: ignore[attr-defined]
            b._lora_ext_live_ranks = ranks  # type: ignore[attr-defined]
        ranks[slot] = rank


def _live_rank(stacked: torch.Tensor, slot: int, full: int) -> int:
    ranks = getattr(stacked, "_lora_ext_live_ranks", None)
    return full if ranks is None else ranks[slot]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() is a no-op for a matching dtype but still costs a dispatch; this is the hot loop.
    return t if t.dtype == dtype else t.to(dtype)


def _weight(stacked: torch.Tensor, slot: int, rows_out: int, dtype: torch.dtype) -> torch.Tensor:
    w = stacked[slot, 0]
    if w.shape[0] != rows_out:
        w = w[:rows_out]
    return _as(w, dtype)


def _gather(t: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    return t if groups.perm is None else t.index_select(0, groups.perm)


def _scatter(y: torch.Tensor, out: torch.Tensor, groups: TokenGroups, add: bool) -> None:
    """Write rows computed in grouped order back to their batch positions."""
    if groups.perm is None:
        return
    if add:
        y.index_add_(0, groups.perm, out)
    else:
        y.index_copy_(0, groups.perm, out)


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
    if groups.empty:
        return
    gathered = _gather(x, groups)  # once for all slices: they share the input
    for s, a in enumerate(lora_a):
        buf = buffers[s]
        xs = _as(gathered, buf.dtype)
        out = buf if groups.perm is None else buf.new_empty(len(groups.perm), buf.shape[-1])
        for slot, rows in groups.segments:
            r = _live_rank(a, slot, a.shape[2])
            if r < out.shape[-1]:
                out[rows, r:] = 0
            if r == 0:
                continue
            torch.mm(xs[rows], _as(a[slot, 0, :r], buf.dtype).t(), out=out[rows, :r])
            if scale != 1.0:
                out[rows, :r] *= scale
        _scatter(buf, out, groups, add=False)


def expand(
    y: torch.Tensor,  # [num_tokens, >= offset_start + sum(output_slices)]
    buffers: torch.Tensor | Sequence[torch.Tensor],  # n_slices x [num_tokens, rank]
    lora_b: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, out_s, rank]
    output_slices: Sequence[int],
    groups: TokenGroups,
    offset_start: int = 0,
    add_inputs: bool = True,
) -> None:
    """``y[t, off_s:off_s+out_s] (+)= buf[s][t] @ B_s[i].T`` for ``i = idx[t] >= 0``."""
    if groups.empty:
        return
    cols = slice(offset_start, offset_start + sum(output_slices))
    target = (
        y[:, cols] if groups.perm is None else y.new_zeros(len(groups.perm), cols.stop - cols.start)
    )
    offset = 0
    for s, (b, size) in enumerate(zip(lora_b, output_slices, strict=True)):
        bs = _as(_gather(buffers[s], groups), y.dtype)
        for slot, rows in groups.segments:
            region = target[rows, offset : offset + size]
            r = _live_rank(b, slot, b.shape[3])
            if r == 0:
                if not (add_inputs or groups.perm is not None):
                    region.zero_()
                continue
            b_t = _weight(b, slot, size, y.dtype)[:, :r].t()
            if add_inputs or groups.perm is not None:
                region.addmm_(bs[rows, :r], b_t)
            else:
                torch.mm(bs[rows, :r], b_t, out=region)
        offset += size
    if groups.perm is not None:
        _scatter(y[:, cols], target, groups, add=add_inputs)


def lora_linear(
    y: torch.Tensor,  # [num_tokens, sum(output_slices)]
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, rank, in]
    lora_b: Sequence[torch.Tensor],  # n_slices x [max_loras, 1, out_s, rank]
    scale: float,
    output_slices: Sequence[int],
    groups: TokenGroups,
    gather: bool | None = None,
) -> None:
    """``y[t, slice s] += scale * (x[t] @ A_s[i].T) @ B_s[i].T`` for ``i = idx[t] >= 0``.

    Shrink in float32 (as vLLM's buffer), expand in ``y``'s dtype. Each slot is computed at its
    live rank; a module no adapter of the batch targets costs nothing. Two ways, same result:
    grouped (one matmul per adapter: prefill, few adapters) or gathered (each token's weights
    copied, one batched matmul per module slice: decode with many adapters; ``gather`` forces
    one or the other).
    """
    if groups.empty:
        return
    ranks = [[_live_rank(a, slot, a.shape[2]) for slot, _ in groups.segments] for a in lora_a]
    if not any(any(per) for per in ranks):
        return
    if gather is None:
        gather = groups.many_small
    f32 = torch.float32
    if gather:
        positions, slots = groups.row_slots
        xs = _as(x.index_select(0, positions), f32)
        target = y.new_zeros(len(positions), y.shape[1])
    else:
        xs = _as(_gather(x, groups), f32)
        target = y if groups.perm is None else y.new_zeros(len(groups.perm), y.shape[1])
    segments = _rows(groups, gather)
    offset = 0
    for a, b, size, per in zip(lora_a, lora_b, output_slices, ranks, strict=True):
        rmax = max(per)
        if rmax == 0:  # a module this batch's adapters do not target
            offset += size
            continue
        if gather and len(xs) * rmax * (a.shape[3] + size) * 4 <= GATHER_MAX_BYTES:
            # Padding rows past a slot's own rank are zero in A and B: exact.
            w_a = _as(a[:, 0, :rmax].index_select(0, slots), f32)  # [T, r, in]
            xa = torch.bmm(w_a, xs.unsqueeze(2))  # [T, r, 1]
            if scale != 1.0:
                xa *= scale
            w_b = _as(b[:, 0, :size, :rmax].index_select(0, slots), y.dtype)  # [T, out, r]
            target[:, offset : offset + size] += torch.bmm(w_b, _as(xa, y.dtype)).squeeze(2)
        else:
            for (slot, rows), r in zip(segments, per, strict=True):
                if r == 0:  # a module this adapter does not target
                    continue
                xa = torch.mm(xs[rows], _as(a[slot, 0, :r], f32).t())
                if scale != 1.0:
                    xa *= scale
                b_t = _weight(b, slot, size, y.dtype)[:, :r].t()
                target[rows, offset : offset + size].addmm_(_as(xa, y.dtype), b_t)
        offset += size
    if gather:
        y.index_add_(0, positions, target)
    else:
        _scatter(y, target, groups, add=True)


def _rows(groups: TokenGroups, gathered: bool) -> Sequence[tuple[int, slice]]:
    """Segments as row ranges of the gathered order (``row_slots``) or of ``_gather``'s."""
    if not gathered or groups.perm is not None:
        return groups.segments
    out, first = [], 0
    for slot, rows in groups.segments:
        n = rows.stop - rows.start
        out.append((slot, slice(first, first + n)))
        first += n
    return out
