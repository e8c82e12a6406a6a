"""Merged deltas: a request names a merge {adapter_k: w_k} and gets the weighted sum of deltas.

``Σ_k w_k s_k (x A_kᵀ) B_kᵀ`` is the "cat" merge of rank ``Σ r_k``: the stacked factors
``[w_1 s_1 A_1; …; w_K s_K A_K]`` and ``[B_1 … B_K]``. Nothing merged is ever materialised:
each token carries a *recipe* index into a small table of (adapter slots, weights) rows, and
the kernels of :mod:`lora_kernels.multi_lora` gather the K factors of a recipe as the column
groups of one ``K * R_BLOCK``-wide tile. A plain adapter is a recipe of one entry with weight 1,
so merged and single-adapter requests share one launch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import triton

from lora_kernels.configs import KernelConfig
from lora_kernels.metadata import SliceTable, WorkList, build_slice_table
from lora_kernels.multi_lora import launch_groups


@dataclass(frozen=True)
class RecipeTable:
    ids: torch.Tensor  # [G, K] int32 adapter slots, -1 padded; K a power of two
    weights: torch.Tensor  # [G, K] fp32, 0 where ids == -1

    @property
    def max_k(self) -> int:
        return self.ids.shape[1]

    @property
    def num_recipes(self) -> int:
        return self.ids.shape[0]


def build_recipes(
    recipes: Sequence[Mapping[int, float]],  # G recipes {slot: weight}; {i: 1.0} = adapter i
    device: torch.device | str = "cpu",
) -> RecipeTable:
    """Pad recipes to a common power-of-two K so the stacked tile width is a power of two."""
    assert recipes, "at least one recipe"
    assert all(len(r) >= 1 for r in recipes), "a recipe names at least one adapter"
    assert all(i >= 0 for r in recipes for i in r), "adapter slots are >= 0"
    k = triton.next_power_of_2(max(len(r) for r in recipes))
    ids = torch.full((len(recipes), k), -1, dtype=torch.int32)
    weights = torch.zeros((len(recipes), k), dtype=torch.float32)
    for g, recipe in enumerate(recipes):
        for j, (slot, w) in enumerate(recipe.items()):
            ids[g, j], weights[g, j] = slot, float(w)
    return RecipeTable(ids.to(device), weights.to(device))


def merged_delta(
    y: torch.Tensor,  # [T, N_y] updated in place; slice s writes columns off_s : off_s + N_s
    x: torch.Tensor,  # [T, H]
    lora_a: Sequence[torch.Tensor],  # per slice [slots, R_max, H]
    lora_b: Sequence[torch.Tensor],  # per slice [slots, N_s, R_max]
    recipe_idx: torch.Tensor,  # [T] int, row of `recipes`, -1 = base model only
    recipes: RecipeTable,  # G rows of (slots, weights)
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] fp32
    *,
    offset_start: int = 0,
    max_rank: int | None = None,  # host-known max rank of the named adapters; narrows R_BLOCK
    table: SliceTable | None = None,
    work: WorkList | None = None,  # prebuilt by build_work_list(recipe_idx, G, block_m)
    config: KernelConfig | None = None,
) -> None:
    """y[t, off_s:off_s+N_s] += Σ_k w_gk · s_i · (x[t] @ A_s[i, :r_i]ᵀ) @ B_s[i, :, :r_i]ᵀ,
    i = ids[g, k], g = recipe_idx[t]; ids == -1 add nothing; recipe_idx[t] == -1: untouched.
    """
    assert recipes.ids.shape == recipes.weights.shape
    assert recipes.ids.dtype == torch.int32 and recipes.weights.dtype == torch.float32
    table = table or build_slice_table(lora_a, lora_b, offset_start)
    launch_groups(
        y, x, table, recipe_idx, recipes.num_recipes, recipes.ids, recipes.weights, ranks, scales,
        recipes=True, max_k=recipes.max_k, max_rank=max_rank or table.r_max, work=work,
        config=config,
    )  # fmt: skip


def merged_delta_ref(
    y: torch.Tensor,  # [T, N_y]
    x: torch.Tensor,  # [T, H]
    lora_a: Sequence[torch.Tensor],  # per slice [slots, R_max, H]
    lora_b: Sequence[torch.Tensor],  # per slice [slots, N_s, R_max]
    recipe_idx: torch.Tensor,  # [T]
    recipes: Sequence[Mapping[int, float]],  # G recipes {slot: weight}
    ranks: torch.Tensor,  # [slots]
    scales: torch.Tensor,  # [slots]
    offset_start: int = 0,
) -> torch.Tensor:
    """float64 reference of :func:`merged_delta` by materialising each recipe's merged ΔW_s."""
    out = y.to(torch.float64).clone()
    xd = x.to(torch.float64)
    for t, g in enumerate(recipe_idx.tolist()):
        if g < 0:
            continue
        off = offset_start
        for a, b in zip(lora_a, lora_b, strict=True):
            a3, b3 = a.reshape(a.shape[0], *a.shape[-2:]), b.reshape(b.shape[0], *b.shape[-2:])
            delta_w = torch.zeros(b3.shape[1], a3.shape[2], dtype=torch.float64)
            for i, w in recipes[g].items():
                r = int(ranks[i])
                delta_w += w * float(scales[i]) * b3[i, :, :r].double() @ a3[i, :r].double()
            out[t, off : off + b3.shape[1]] += delta_w @ xd[t]
            off += b3.shape[1]
    return out
