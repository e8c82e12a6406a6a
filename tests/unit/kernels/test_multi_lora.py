"""Multi-LoRA kernels (fused and two-pass) under the strict interpreter vs a float64 reference."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from lora_problem import TOLERANCES, assert_matches, make_problem
from vllm_oracle import vllm_triton_lora_ops

from lora_kernels.configs import KernelConfig, load_entries, select_config
from lora_kernels.metadata import build_work_list, max_work_items
from lora_kernels.multi_lora import multi_lora, multi_lora_ref

# Large blocks, small grids: the interpreter costs ~2 ms per program.
CONFIGS = {
    "fused": KernelConfig("fused", 16, 32, 64, 64, 1, 4, 1),
    "fused-narrow-n": KernelConfig("fused", 16, 16, 32, 16, 1, 4, 1),
    "two-pass": KernelConfig("two_pass", 16, 32, 64, 64, 1, 4, 1),
    "two-pass-split-k": KernelConfig("two_pass", 16, 32, 32, 64, 2, 4, 1),
}
DTYPES = [torch.float16, torch.float32]
RAGGED = [16, 8, 12, 4]  # four slots, R_max 16, three ranks below it


def run(p, idx, cfg, **kw) -> torch.Tensor:
    y = p.y()
    multi_lora(y, p.x, p.lora_a, p.lora_b, idx, p.ranks, p.scales,
               offset_start=p.offset_start, config=cfg, **kw)  # fmt: skip
    return y


def check(p, idx, cfg, **kw) -> None:
    y = run(p, idx, cfg, **kw)
    ref = multi_lora_ref(p.y0, p.x, p.lora_a, p.lora_b, idx, p.ranks, p.scales, p.offset_start)
    assert_matches(y, ref, p, idx >= 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_batch_ragged_ranks_three_slices(name, dtype):
    p = make_problem(dtype, 21, RAGGED)
    idx = torch.tensor([0, -1, 2, 3, 3, 1, -1, 0, 2, 2, 1, 3, -1, 0, 0, 1, 2, 3, 3, 3, 0])
    check(p, idx, CONFIGS[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "two-pass-split-k"])
def test_all_tokens_without_adapter_leave_y_bit_identical(name, dtype):
    p = make_problem(dtype, 9, RAGGED)
    y = run(p, torch.full((9,), -1), CONFIGS[name])
    assert torch.equal(y, p.y0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "two-pass"])
@pytest.mark.parametrize("slot", [-1, 1])
def test_one_token(slot, name, dtype):
    p = make_problem(dtype, 1, RAGGED)
    check(p, torch.tensor([slot]), CONFIGS[name])


@pytest.mark.parametrize("name", ["fused", "two-pass-split-k"])
def test_many_adapters_more_blocks_than_tokens_per_adapter(name):
    ranks = [8, 16, 32, 24] * 6  # 24 slots, R_max 32
    p = make_problem(torch.float16, 53, ranks, sizes=(48,), hidden=64, offset_start=0)
    idx = torch.randint(-1, len(ranks), (53,))
    idx[:20] = 5  # one adapter spans two token blocks
    check(p, idx, CONFIGS[name])


def test_max_rank_narrows_the_tile_and_keeps_the_result():
    p = make_problem(torch.float32, 12, [8, 4, 8], sizes=(32,))
    idx = torch.tensor([0, 1, 2, -1] * 3)
    check(p, idx, CONFIGS["fused"], max_rank=8)


def test_offset_start_and_column_tail_are_respected_with_4d_vllm_weights():
    p = make_problem(torch.float16, 7, RAGGED, sizes=(24, 8), offset_start=11, tail=13)
    p.lora_a = [a.unsqueeze(1) for a in p.lora_a]  # vLLM's [slots, 1, R, H]
    p.lora_b = [b.unsqueeze(1) for b in p.lora_b]
    check(p, torch.tensor([3, 0, -1, 1, 2, 2, 3]), CONFIGS["two-pass"])


def test_scale_error_of_two_percent_is_caught_by_the_tolerance():
    p = make_problem(torch.float16, 8, RAGGED)
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    y = run(p, idx, CONFIGS["fused"])
    wrong = multi_lora_ref(p.y0, p.x, p.lora_a, p.lora_b, idx, p.ranks, p.scales * 1.02, 3)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y.double(), wrong, **TOLERANCES[torch.float16])


def test_configs_from_the_file_run_end_to_end():
    """Default config selection (configs.json) on a decode-sized and a larger batch."""
    for tokens in (3, 40):
        p = make_problem(torch.float16, tokens, [16, 8], sizes=(64, 32), hidden=128)
        check(p, torch.randint(-1, 2, (tokens,)), None)


def test_work_list_covers_each_adapter_token_once_in_blocks():
    idx = torch.tensor([2, -1, 0, 2, 2, 5, -1, 0, 2, 2, 2, 2, 2, 5])
    wl = build_work_list(idx, num_groups=6, block_m=4)
    assert wl.max_work == max_work_items(14, 6, 4)
    seen = []
    for group, start, length in wl.work.tolist():
        if group < 0:
            continue
        assert 1 <= length <= 4
        toks = wl.sorted_tokens[start : start + length].tolist()
        assert all(idx[t] == group for t in toks)
        seen += toks
    assert sorted(seen) == [t for t in range(14) if idx[t] >= 0]
    groups = [g for g, _, _ in wl.work.tolist() if g >= 0]
    assert groups == [0, 2, 2, 5], "only blocks with tokens, ordered by group"
    assert all(g == -1 for g, _, _ in wl.work.tolist()[len(groups) :]), "-1 tail"
    empty = build_work_list(torch.full((5,), -1), num_groups=3, block_m=16)
    assert (empty.work[:, 0] == -1).all()


def test_config_file_parses_and_buckets_select_as_documented():
    entries = load_entries()
    assert entries and all(e.config.path in ("fused", "two_pass") for e in entries)
    small, large = select_config(1, 16), select_config(10**6, 16)
    assert small.block_m <= large.block_m
    wide = [e.config for e in entries if e.r_block >= 128 and e.max_tokens >= 1]
    assert select_config(1, 128) == wide[0], "rank 128 takes the first bucket that covers it"
    with pytest.raises(ValueError, match="no kernel config"):
        select_config(1, 1024)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@pytest.mark.parametrize(
    ("dtype", "k", "ok"),
    [(torch.float16, 8, False), (torch.float16, 16, True), (torch.float32, 8, False),
     (torch.float32, 16, True)],
)  # fmt: skip
def test_interpreter_is_strict_about_dot_k_like_the_nvidia_backend(dtype, k, ok):
    """fp16 needs K >= 16 (NVIDIA); fp32 K >= 16 too, Triton 3.6's rule (3.9 allows 8)."""
    a, b = torch.randn(16, k).to(dtype), torch.randn(k, 16).to(dtype)
    c = torch.empty(16, 16, dtype=torch.float32)
    if ok:
        _dot_kernel[(1,)](a, b, c, 16, 16, k)
        torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2)
    else:
        with pytest.raises(Exception, match=f"K >= {2 * k}"):
            _dot_kernel[(1,)](a, b, c, 16, 16, k)


@pytest.mark.parametrize("name", ["fused", "two-pass-split-k"])
def test_agrees_with_vllm_lora_shrink_expand(name):
    """Second oracle: vLLM's own Triton ops on the same batch (uniform rank, one scale).

    vLLM's ops have no per-adapter rank or scale, so every slot uses R_max and the same scale.
    """
    from vllm.lora.ops.triton_ops import LoRAKernelMeta

    p = make_problem(torch.float16, 11, [16, 16, 16], offset_start=0, tail=0)
    p.lora_a = [a.unsqueeze(1) for a in p.lora_a]
    p.lora_b = [b.unsqueeze(1) for b in p.lora_b]
    p.scales = torch.full((3,), 0.75)
    idx = torch.tensor([2, 0, -1, 2, 1, 1, 0, -1, 2, 2, 0])
    ours = run(p, idx, CONFIGS[name])
    meta = LoRAKernelMeta.make(max_loras=3, max_num_tokens=11, device="cpu")
    meta.prepare_tensors(idx)
    theirs = p.y()
    buf = torch.empty(len(p.lora_a), 11, 16, dtype=torch.float32)
    with vllm_triton_lora_ops() as (shrink, expand):
        shrink(p.x, p.lora_a, buf, *meta.meta_args(11, True), 0.75)
        expand(buf, p.lora_b, theirs, *meta.meta_args(11, True), offset_start=0, add_inputs=True)
    torch.testing.assert_close(ours, theirs, **TOLERANCES[torch.float16])
    assert not torch.equal(theirs, p.y0), "vLLM's ops did something"
