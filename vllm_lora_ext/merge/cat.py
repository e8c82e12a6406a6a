"""The "cat" merge: the exact weighted sum of adapters, as one adapter of rank sum(r_k).

``delta(x) = sum_k w_k * s_k * B_k @ A_k @ x`` equals ``B_cat @ A_cat @ x`` with
``A_cat = [w_1 s_1 A_1; ...; w_K s_K A_K]`` (rows) and ``B_cat = [B_1 ... B_K]`` (columns), at
scale 1 (``lora_alpha = r``). No dense merged weight is ever formed, and serving it costs what
serving the K adapters side by side costs. Same convention as PEFT's
``add_weighted_adapter(combination_type="cat")``: the weight and scale go into A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_lora_ext.adapters.lora_weights import LoraWeights


def cat_merge(adapters: Sequence[LoraWeights], weights: Sequence[float]) -> LoraWeights:
    """Merge ``adapters`` with ``weights``; a module missing from an adapter contributes zeros."""
    if not adapters or len(adapters) != len(weights):
        raise ValueError("need one weight per adapter, and at least one adapter")
    modules = sorted({m for a in adapters for m in a.modules()})
    rank = sum(a.rank for a in adapters)
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        a_parts, b_parts = [], []
        for adapter, w in zip(adapters, weights, strict=True):
            a = adapter.tensors.get(f"{module}.lora_A.weight")
            b = adapter.tensors.get(f"{module}.lora_B.weight")
            if a is None:
                ref_a, ref_b = _shapes_of(adapters, module)
                a = torch.zeros(adapter.rank, ref_a, dtype=torch.float32)
                b = torch.zeros(ref_b, adapter.rank, dtype=torch.float32)
            a_parts.append(a.float() * (w * adapter.scaling))
            b_parts.append(b.float())
        tensors[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0)
        tensors[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1)
    return LoraWeights(tensors=tensors, rank=rank, lora_alpha=float(rank))


def _shapes_of(adapters: Sequence[LoraWeights], module: str) -> tuple[int, int]:
    for adapter in adapters:
        a = adapter.tensors.get(f"{module}.lora_A.weight")
        if a is not None:
            return a.shape[1], adapter.tensors[f"{module}.lora_B.weight"].shape[0]
    raise KeyError(module)
