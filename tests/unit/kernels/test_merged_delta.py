"""Merged-delta launches (recipes of K adapters mixed with single adapters) vs float64."""

from __future__ import annotations

import pytest
import torch
from lora_problem import assert_matches, make_problem

from lora_kernels.configs import KernelConfig
from lora_kernels.merged_delta import build_recipes, merged_delta, merged_delta_ref
from lora_kernels.multi_lora import multi_lora

CONFIGS = {
    "fused": KernelConfig("fused", 16, 32, 64, 64, 1, 4, 1),
    "two-pass-split-k": KernelConfig("two_pass", 16, 32, 32, 64, 2, 4, 1),
}
RANKS = [16, 8, 12, 4, 16]
RECIPES = [
    {0: 1.0},  # plain adapters are recipes of one
    {2: 1.0},
    {0: 0.5, 1: 0.3, 3: 0.2},  # K=3, padded to 4
    {4: -0.7, 2: 1.3},
    {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25},
]


def run(p, recipe_idx, recipes, cfg) -> torch.Tensor:
    y = p.y()
    table = build_recipes(recipes)
    merged_delta(y, p.x, p.lora_a, p.lora_b, recipe_idx, table, p.ranks, p.scales,
                 offset_start=p.offset_start, config=cfg)  # fmt: skip
    return y


def check(p, recipe_idx, recipes, cfg) -> None:
    y = run(p, recipe_idx, recipes, cfg)
    ref = merged_delta_ref(
        p.y0, p.x, p.lora_a, p.lora_b, recipe_idx, recipes, p.ranks, p.scales, p.offset_start
    )
    assert_matches(y, ref, p, recipe_idx >= 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merges_mixed_with_single_adapters_and_base_tokens(name, dtype):
    p = make_problem(dtype, 23, RANKS)
    idx = torch.tensor([2, 0, -1, 4, 4, 1, 3, 2, -1, 0, 3, 3, 4, 2, 1, 1, 0, -1, 2, 4, 3, 2, 2])
    check(p, idx, RECIPES, CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_base_tokens_and_one_token(name):
    p = make_problem(torch.float16, 6, RANKS)
    y = run(p, torch.full((6,), -1), RECIPES, CONFIGS[name])
    assert torch.equal(y, p.y0)
    p1 = make_problem(torch.float16, 1, RANKS)
    check(p1, torch.tensor([4]), RECIPES, CONFIGS[name])


def test_single_recipes_equal_the_multi_lora_launch_bit_for_bit():
    """K=1 recipes with weight 1 are exactly plain multi-LoRA (same tiles, same rounding)."""
    p = make_problem(torch.float16, 10, RANKS, sizes=(32, 16))
    idx = torch.tensor([0, 3, -1, 4, 4, 1, 2, 0, -1, 3])
    ours = run(p, idx, [{i: 1.0} for i in range(len(RANKS))], CONFIGS["fused"])
    plain = p.y()
    multi_lora(plain, p.x, p.lora_a, p.lora_b, idx, p.ranks, p.scales,
               offset_start=p.offset_start, config=CONFIGS["fused"])  # fmt: skip
    assert torch.equal(ours, plain)


def test_recipe_weight_scales_the_delta_linearly():
    p = make_problem(torch.float32, 4, RANKS, sizes=(32,))
    p.x[1] = p.x[0]
    p.y0[1] = p.y0[0]
    idx = torch.tensor([0, 1, 0, 1])
    y = run(p, idx, [{2: 1.0}, {2: 3.0}], CONFIGS["two-pass-split-k"])
    d = y.double() - p.y0.double()
    torch.testing.assert_close(d[1], 3 * d[0], atol=1e-5, rtol=1e-5)


def test_build_recipes_pads_to_a_power_of_two():
    table = build_recipes([{3: 0.5, 1: 0.5, 0: 2.0}, {7: 1.0}])
    assert table.ids.tolist() == [[3, 1, 0, -1], [7, -1, -1, -1]]
    assert table.weights.tolist() == [[0.5, 0.5, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(AssertionError):
        build_recipes([{}])
