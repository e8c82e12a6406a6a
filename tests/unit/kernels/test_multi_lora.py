"""Multi-LoRA kernels (fused and two-pass) under the strict interpreter vs a float64 reference."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lora_kernels.configs import KernelConfig, load_entries, select_config
from lora_kernels.metadata import build_work_list, max_work_items
from lora_kernels.multi_lora import multi_lora
from lora_kernels.testing import (
    TOLERANCES,
    assert_matches,
    interpreted_vllm_ops,
    make_problem,
    multi_lora_ref,
    reference,
    vllm_apply,
)

# Large blocks, small grids: the interpreter costs ~2 ms per program.
CONFIGS = {
    "fused": KernelConfig("fused", 16, 32, 64, 64, 1, 4, 1),
    "fused-narrow-n": KernelConfig("fused", 16, 16, 32, 16, 1, 4, 1),
    "two-pass": KernelConfig("two_pass", 16, 32, 64, 64, 1, 4, 1),
    "two-pass-split-k": KernelConfig("two_pass", 16, 32, 32, 64, 2, 4, 1),
}
DTYPES = [torch.float16, torch.float32]
RAGGED = [16, 8, 12, 4]  # four slots, R_max 16, three ranks below it


def run(p, cfg, **kw) -> torch.Tensor:
    y = p.fresh_y()
    multi_lora(y, p.x, p.lora_a, p.lora_b, p.idx, p.ranks, p.scales,
               offset_start=p.offset_start, config=cfg, live_ranks=p.live_ranks, **kw)  # fmt: skip
    return y


def check(p, cfg, **kw) -> None:
    assert_matches(run(p, cfg, **kw), reference(p), p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_batch_ragged_ranks_three_slices(name, dtype):
    idx = torch.tensor([0, -1, 2, 3, 3, 1, -1, 0, 2, 2, 1, 3, -1, 0, 0, 1, 2, 3, 3, 3, 0])
    check(make_problem(dtype, 21, RAGGED, idx=idx), CONFIGS[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "two-pass-split-k"])
def test_all_tokens_without_adapter_leave_y_bit_identical(name, dtype):
    p = make_problem(dtype, 9, RAGGED, idx=torch.full((9,), -1))
    assert torch.equal(run(p, CONFIGS[name]), p.y0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "two-pass"])
@pytest.mark.parametrize("slot", [-1, 1])
def test_one_token(slot, name, dtype):
    check(make_problem(dtype, 1, RAGGED, idx=torch.tensor([slot])), CONFIGS[name])


@pytest.mark.parametrize("name", ["fused", "two-pass-split-k"])
def test_many_adapters_more_blocks_than_tokens_per_adapter(name):
    ranks = [8, 16, 32, 24] * 6  # 24 slots, R_max 32
    idx = torch.randint(-1, len(ranks), (53,))
    idx[:20] = 5  # one adapter spans two token blocks
    p = make_problem(torch.float16, 53, ranks, sizes=(48,), hidden=64, offset_start=0, idx=idx)
    check(p, CONFIGS[name])


def _untargeted(p, live: list[list[int]]):
    """``live`` as the problem's per-slice ranks; where it is 0 the slot's weights of that slice
    are NaN: a program that read them would write NaN."""
    p.live_ranks = torch.tensor(live, dtype=torch.int32)
    for s, row in enumerate(live):
        for slot, rank in enumerate(row):
            if rank == 0:
                p.lora_a[s][slot] = float("nan")
                p.lora_b[s][slot] = float("nan")
    return p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fused", "two-pass", "two-pass-split-k"])
def test_slices_an_adapter_does_not_target_are_skipped(name, dtype):
    """Per-slice ranks (as vLLM's slots hold them: a q/v adapter leaves k at zero): a slice at
    rank 0 for a slot is neither read nor written for its tokens, one below the slot's rank is
    computed to that rank only (junk past it), against the float64 reference."""
    idx = torch.tensor([0, -1, 2, 3, 3, 1, -1, 0, 2, 2, 1, 3, 0, 1, 2])
    p = make_problem(dtype, 15, RAGGED, idx=idx)
    _untargeted(p, [[16, 0, 12, 4], [0, 8, 0, 2], [16, 8, 6, 0]])
    y = run(p, CONFIGS[name])
    assert torch.isfinite(y).all()
    assert_matches(y, reference(p), p)
    slice_1 = slice(p.offset_start + p.sizes[0], p.offset_start + sum(p.sizes[:2]))
    for slot in (0, 2):  # untargeted there: bit-identical to the poison
        assert torch.equal(y[idx == slot, slice_1], p.y0[idx == slot, slice_1])


@pytest.mark.parametrize("name", ["fused", "two-pass-split-k"])
def test_a_module_no_adapter_of_the_batch_targets_costs_nothing_and_changes_nothing(name):
    """Every slice at rank 0 for every slot in the batch (a module outside the adapters'
    targets): all NaN weights, the output bit-identical to the input."""
    p = make_problem(torch.float16, 9, RAGGED, idx=torch.tensor([0, 1, 2, 3, -1, 3, 2, 1, 0]))
    _untargeted(p, [[0] * 4 for _ in p.sizes])
    assert torch.equal(run(p, CONFIGS[name]), p.y0)


def test_max_rank_narrows_the_tile_and_keeps_the_result():
    p = make_problem(torch.float32, 12, [8, 4, 8], sizes=(32,), idx=torch.tensor([0, 1, 2, -1] * 3))
    check(p, CONFIGS["fused"], max_rank=8)


def test_offset_start_and_column_tail_are_respected_with_4d_vllm_weights():
    idx = torch.tensor([3, 0, -1, 1, 2, 2, 3])
    p = make_problem(torch.float16, 7, RAGGED, sizes=(24, 8), offset_start=11, tail=13, idx=idx)
    check(p.vllm_layout(), CONFIGS["two-pass"])  # vLLM's [slots, 1, R, H]


def test_scale_error_of_two_percent_is_caught_by_the_tolerance():
    p = make_problem(torch.float16, 8, RAGGED, idx=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    y = run(p, CONFIGS["fused"])
    wrong = multi_lora_ref(p.y0, p.x, p.lora_a, p.lora_b, p.idx, p.ranks, p.scales * 1.02, 3)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y.double(), wrong, **TOLERANCES[torch.float16])


def test_configs_from_the_file_run_end_to_end():
    """Default config selection (configs/default.json) on a decode-sized and a larger batch."""
    for tokens in (3, 40):
        check(make_problem(torch.float16, tokens, [16, 8], sizes=(64, 32), hidden=128), None)


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
    from vllm.lora.ops.triton_ops import (
        LoRAKernelMeta,
        kernel_utils,
        lora_expand_op,
        lora_shrink_op,
        utils,
    )

    idx = torch.tensor([2, 0, -1, 2, 1, 1, 0, -1, 2, 2, 0])
    p = make_problem(torch.float16, 11, [16, 16, 16], offset_start=0, tail=0, idx=idx)
    p = p.vllm_layout()
    p.scales = torch.full((3,), 0.75)
    ours = run(p, CONFIGS[name])
    theirs = p.fresh_y()
    modules = (kernel_utils, lora_shrink_op, lora_expand_op, utils, LoRAKernelMeta)
    with interpreted_vllm_ops(*modules) as ops:
        vllm_apply(ops, p, theirs, scale=0.75)()
    torch.testing.assert_close(ours, theirs, **TOLERANCES[torch.float16])
    assert not torch.equal(theirs, p.y0), "vLLM's ops did something"


def test_a_device_takes_its_tuned_file_and_every_other_the_default(tmp_path, monkeypatch):
    """``configs/<gpu>.json`` serves that GPU once a tuning run wrote it; the seed
    ``default.json`` serves the rest and is never written by a tuning run."""
    from dataclasses import replace

    from lora_kernels import configs

    assert configs.device_file("NVIDIA H200").name == "NVIDIA_H200.json"
    assert configs.config_path("No Such GPU") == configs.DEFAULT_PATH
    assert configs.config_path() == configs.DEFAULT_PATH  # no CUDA device here
    seed = load_entries(configs.DEFAULT_PATH)
    tuned = [replace(e, config=replace(e.config, num_warps=8)) for e in seed]
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    try:
        configs.config_path.cache_clear()
        configs.write_entries(tuned, "test", "NVIDIA H200", configs.device_file("NVIDIA H200"))
        assert configs.config_path("NVIDIA H200") == tmp_path / "NVIDIA_H200.json"
        assert select_config(1, 16, configs.config_path("NVIDIA H200")).num_warps == 8
        assert configs.config_path("NVIDIA H100") == configs.DEFAULT_PATH
        with pytest.raises(AssertionError, match="not the seed"):
            configs.write_entries(tuned, "test", None, configs.DEFAULT_PATH)
    finally:
        configs.config_path.cache_clear()
