"""Grouped CPU LoRA ops against a float64 reference and against vLLM's own torch ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lora_ext.cpu_lora.segment_ops import (
    expand,
    group_tokens,
    lora_linear,
    note_live_ranks,
    shrink,
)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}
HIDDEN, RANK, MAX_LORAS = 48, 8, 5
SLICES = (48, 16, 16)  # q/k/v-like packed output

INDEX_CASES = {
    "one-token": [2],
    "one-token-none": [-1],
    "all-none": [-1] * 7,
    "ragged-segments": [0] * 5 + [-1] * 3 + [3] * 1 + [4] * 9 + [1] * 2,
    "interleaved-decode": [1, 4, -1, 1, 0, 4, 4, -1, 2, 1, 3, 0],
    "many-adapters-full-slots": [i % MAX_LORAS for i in range(17)] + [-1, -1],
}


def weights(dtype: torch.dtype, g: torch.Generator):
    a = [torch.randn(MAX_LORAS, 1, RANK, HIDDEN, generator=g).to(dtype) for _ in SLICES]
    b = [torch.randn(MAX_LORAS, 1, n, RANK, generator=g).to(dtype) / RANK for n in SLICES]
    return a, b


def reference(y, x, lora_a, lora_b, scale, idx):
    out = y.double().clone()
    for t, i in enumerate(idx):
        if i < 0:
            continue
        off = 0
        for a, b, n in zip(lora_a, lora_b, SLICES, strict=True):
            xa = scale * (x[t].double() @ a[i, 0].double().T)
            out[t, off : off + n] += xa @ b[i, 0].double().T
            off += n
    return out


def test_group_tokens_contiguous_needs_no_permutation():
    g = group_tokens(torch.tensor([-1, 2, 2, 0, 0, 0, -1]))
    assert g.perm is None and g.num_tokens == 7
    assert dict(g.segments) == {2: slice(1, 3), 0: slice(3, 6)}


def test_group_tokens_interleaved_sorts_by_slot_and_skips_none():
    g = group_tokens(torch.tensor([3, 3, -1, 0, 0, 0, 3, -1]))
    assert g.num_tokens == 8
    assert g.perm.tolist() == [0, 1, 6, 3, 4, 5]
    assert dict(g.segments) == {3: slice(0, 3), 0: slice(3, 6)}
    assert group_tokens(torch.tensor([-1, -1])).empty
    assert group_tokens(torch.tensor([], dtype=torch.long)).empty


@pytest.mark.parametrize("gather", [False, True, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_lora_linear_matches_float64_reference(case, dtype, gather):
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    idx = INDEX_CASES[case]
    x = torch.randn(len(idx), HIDDEN, generator=g).to(dtype)
    y = torch.randn(len(idx), sum(SLICES), generator=g).to(dtype)
    lora_a, lora_b = weights(dtype, g)
    expected = reference(y, x, lora_a, lora_b, 0.5, idx)
    before = y.clone()
    lora_linear(y, x, lora_a, lora_b, 0.5, SLICES, group_tokens(torch.tensor(idx)), gather)
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])
    none = torch.tensor(idx) < 0
    assert torch.equal(y[none], before[none]), "rows without an adapter must be untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_shrink_then_expand_matches_reference(case, dtype):
    g = torch.Generator().manual_seed(7 + len(case))
    idx = INDEX_CASES[case]
    groups = group_tokens(torch.tensor(idx))
    x = torch.randn(len(idx), HIDDEN, generator=g).to(dtype)
    y = torch.randn(len(idx), sum(SLICES), generator=g).to(dtype)
    lora_a, lora_b = weights(dtype, g)
    expected = reference(y, x, lora_a, lora_b, 2.0, idx)
    buffers = torch.zeros(len(SLICES), len(idx), RANK)  # float32, as vLLM allocates it
    shrink(buffers, x, lora_a, 2.0, groups)
    expand(y, buffers, lora_b, SLICES, groups)
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])


def test_expand_offset_and_overwrite():
    g = torch.Generator().manual_seed(3)
    idx = [1, -1, 1]
    buffers = torch.randn(1, 3, RANK, generator=g)
    b = torch.randn(MAX_LORAS, 1, 16, RANK, generator=g)
    y = torch.full((3, 40), 7.0)
    expand(
        y, buffers, [b], (16,), group_tokens(torch.tensor(idx)), offset_start=8, add_inputs=False
    )
    torch.testing.assert_close(y[0, 8:24], buffers[0, 0] @ b[1, 0].T)
    assert torch.all(y[1] == 7.0) and torch.all(y[:, :8] == 7.0) and torch.all(y[:, 24:] == 7.0)


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_agrees_with_vllm_torch_ops(case):
    """vLLM's ops, given a zero slot for index -1 (their wrap-around bug otherwise)."""
    from vllm.lora.ops.torch_ops import lora_ops

    vllm_shrink = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    g = torch.Generator().manual_seed(11 + len(case))
    idx = torch.tensor(INDEX_CASES[case])
    x = torch.randn(len(idx), HIDDEN, generator=g)
    lora_a, lora_b = weights(torch.float32, g)
    y_ours = torch.randn(len(idx), sum(SLICES), generator=g)
    y_vllm = y_ours.clone()

    lora_linear(y_ours, x, lora_a, lora_b, 1.0, SLICES, group_tokens(idx))

    zero_slot = torch.where(idx < 0, MAX_LORAS, idx)
    off = 0
    for a, b, n in zip(lora_a, lora_b, SLICES, strict=True):
        a_pad = torch.cat([a, torch.zeros_like(a[:1])])
        b_pad = torch.cat([b, torch.zeros_like(b[:1])])
        buf = torch.zeros(len(idx), RANK)
        vllm_shrink(x, a_pad, buf, zero_slot, 1.0)
        lora_ops.bgmv_expand_slice(buf, b_pad, y_vllm, zero_slot, off, n, True)
        off += n
    torch.testing.assert_close(y_ours, y_vllm, atol=1e-5, rtol=1e-5)


def padded_weights(ranks: list[list[int]], g: torch.Generator):
    """Slots as vLLM fills them: slice s of slot i holds rank ``ranks[s][i]`` (0: a module the
    adapter does not target), zeros up to RANK."""
    a, b = weights(torch.float32, g)
    for s, per_slot in enumerate(ranks):
        for i, r in enumerate(per_slot):
            a[s][i, 0, r:] = 0
            b[s][i, 0, :, r:] = 0
    return a, b


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, RANK), min_size=MAX_LORAS, max_size=MAX_LORAS),
             min_size=len(SLICES), max_size=len(SLICES)),
    st.lists(st.integers(-1, MAX_LORAS - 1), min_size=1, max_size=24),
    st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_live_ranks_skip_padding_and_untargeted_modules_exactly(ranks, idx, seed):
    """Noted per slot as vLLM activates it, the live ranks are the adapters' own, and the ops
    that use them still equal the float64 reference on the padded weights."""
    g = torch.Generator().manual_seed(seed)
    lora_a, lora_b = padded_weights(ranks, g)
    for slot in range(MAX_LORAS):
        note_live_ranks(lora_a, lora_b, slot)
    assert [a._lora_ext_live_ranks for a in lora_a] == ranks
    x = torch.randn(len(idx), HIDDEN, generator=g)
    y = torch.randn(len(idx), sum(SLICES), generator=g)
    groups = group_tokens(torch.tensor(idx))
    expected = reference(y, x, lora_a, lora_b, 0.5, idx)
    for gather in (False, True):
        fused = y.clone()
        lora_linear(fused, x, lora_a, lora_b, 0.5, SLICES, groups, gather)
        torch.testing.assert_close(fused.double(), expected, **TOL[torch.float32])
        none = torch.tensor(idx) < 0
        assert torch.equal(fused[none], y[none])
    buffers = torch.full((len(SLICES), len(idx), RANK), float("nan"))  # stale values
    shrink(buffers, x, lora_a, 0.5, groups)
    split = y.clone()
    expand(split, buffers, lora_b, SLICES, groups)
    torch.testing.assert_close(split.double(), expected, **TOL[torch.float32])


def test_a_slot_filled_again_gets_its_new_rank():
    g = torch.Generator().manual_seed(5)
    lora_a, lora_b = padded_weights([[4] * MAX_LORAS] * len(SLICES), g)
    note_live_ranks(lora_a, lora_b, 2)
    assert lora_a[0]._lora_ext_live_ranks == [RANK, RANK, 4, RANK, RANK]  # others: not noted
    lora_a[0][2, 0] = 0  # the next adapter in slot 2 does not target this module
    note_live_ranks(lora_a, lora_b, 2)
    assert lora_a[0]._lora_ext_live_ranks[2] == 0 and lora_b[0]._lora_ext_live_ranks[2] == 0
    assert lora_a[1]._lora_ext_live_ranks[2] == 4


def test_decode_of_many_adapters_goes_the_gathered_way_prefill_the_grouped_way():
    decode = group_tokens(torch.tensor([0, 3, 1, 4, 2, 0, -1, 3]))
    prefill = group_tokens(torch.tensor([0] * 40 + [1] * 30 + [2] * 9 + [3] * 20))
    few = group_tokens(torch.tensor([0, 1, 0, 1]))
    assert decode.many_small and not prefill.many_small and not few.many_small
    positions, slots = decode.row_slots
    assert sorted(positions.tolist()) == [0, 1, 2, 3, 4, 5, 7]
    idx = [0, 3, 1, 4, 2, 0, -1, 3]
    assert [idx[p] for p in positions.tolist()] == slots.tolist()


@pytest.mark.parametrize("case", ["interleaved-decode", "ragged-segments"])
def test_gathered_way_falls_back_per_slice_past_its_memory_bound(case, monkeypatch):
    from vllm_lora_ext.cpu_lora import segment_ops

    monkeypatch.setattr(segment_ops, "GATHER_MAX_BYTES", 0)
    g = torch.Generator().manual_seed(21)
    idx = INDEX_CASES[case]
    x = torch.randn(len(idx), HIDDEN, generator=g)
    y = torch.randn(len(idx), sum(SLICES), generator=g)
    lora_a, lora_b = weights(torch.float32, g)
    expected = reference(y, x, lora_a, lora_b, 0.5, idx)
    lora_linear(y, x, lora_a, lora_b, 0.5, SLICES, group_tokens(torch.tensor(idx)), True)
    torch.testing.assert_close(y.double(), expected, **TOL[torch.float32])
