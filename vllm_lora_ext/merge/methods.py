"""The classic data-free merges behind one table, each equal to PEFT's ``add_weighted_adapter``.

Two families, as in PEFT:

- **factor-wise** (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the
  A matrices are combined with each other and the B matrices with each other, separately, with
  weights ``sign(w_k s_k) sqrt|w_k s_k|`` for A and ``sqrt|w_k s_k|`` for B (``s_k`` the adapter's
  scaling). ``B' A'`` then contains cross terms ``B_j A_k``: a cheap approximation, not the weighted
  sum of the ΔW. All adapters must share one rank (PEFT refuses otherwise; so do we).
- **dense** (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): each adapter's full ``ΔW_k = s_k B_k A_k`` is formed, the ΔW are
  combined elementwise, and the result is re-factorised by SVD to ``svd_rank`` (default: the
  largest adapter rank). Mixed ranks are fine.
- ``cat`` (exact, rank = sum of ranks) lives in :mod:`vllm_lora_ext.merge.cat`.

Every merged adapter has ``lora_alpha = rank`` (scaling 1): the weights and scalings live in the
factors. A module missing from some adapters is merged from the adapters that have it (their
weights only, as PEFT does). Modules are visited in the order they first appear in the adapters'
tensor dicts, which fixes the order of DARE's random draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge import task_tensors as tt
from vllm_lora_ext.merge.cat import cat_merge
from vllm_lora_ext.merge.factor import svd_factor
from vllm_lora_ext.merge.params import (
    DareParams,
    DareSvdParams,
    DareTiesParams,
    DareTiesSvdParams,
    DensityParams,
    MagnitudePruneSvdParams,
    MergeParams,
    NoParams,
    SvdParams,
    TiesParams,
    TiesSvdParams,
)

# (task tensors, float32 weights, params, generator) -> merged tensor
Combine = Callable[[list[torch.Tensor], torch.Tensor, Any, torch.Generator | None], torch.Tensor]
MergeFn = Callable[
    [Sequence[LoraWeights], Sequence[float], Any, torch.Generator | None], LoraWeights
]


@dataclass(frozen=True)
class MergeMethod:
    """One entry of :data:`MERGE_METHODS`: the function and the model its params validate with."""

    fn: MergeFn
    params: type[MergeParams]


def _a(module: str) -> str:
    return f"{module}.lora_A.weight"


def _b(module: str) -> str:
    return f"{module}.lora_B.weight"


def module_order(adapters: Sequence[LoraWeights]) -> list[str]:
    """Union of the adapters' modules, in order of first appearance."""
    seen: dict[str, None] = {}
    for adapter in adapters:
        for key in adapter.tensors:
            if key.endswith(".lora_A.weight"):
                seen.setdefault(key.removesuffix(".lora_A.weight"), None)
    return list(seen)


def check_shapes(adapters: Sequence[LoraWeights]) -> None:
    """ValueError unless every module's factors agree in shape across adapters and with r."""
    shapes: dict[str, tuple[int, int]] = {}
    for k, adapter in enumerate(adapters):
        for module in module_order([adapter]):
            a, b = adapter.tensors[_a(module)], adapter.tensors.get(_b(module))
            if b is None or a.ndim != 2 or b.ndim != 2:
                raise ValueError(f"adapter {k}: {module} needs 2-D lora_A and lora_B")
            if a.shape[0] != adapter.rank or b.shape[1] != adapter.rank:
                raise ValueError(
                    f"adapter {k}: {module} factors {tuple(a.shape)}, {tuple(b.shape)} "
                    f"do not match rank {adapter.rank}"
                )
            io = (a.shape[1], b.shape[0])
            if shapes.setdefault(module, io) != io:
                raise ValueError(
                    f"adapter {k}: {module} maps {io[0]}->{io[1]} but an earlier adapter maps "
                    f"{shapes[module][0]}->{shapes[module][1]}: adapters of different bases?"
                )


def _present(
    adapters: Sequence[LoraWeights], weights: Sequence[float], module: str
) -> list[tuple[LoraWeights, float]]:
    return [(ad, w) for ad, w in zip(adapters, weights, strict=True) if _a(module) in ad.tensors]


def _factorwise(combine: Combine) -> MergeFn:
    def merge(
        adapters: Sequence[LoraWeights],
        weights: Sequence[float],
        params: Any,
        generator: torch.Generator | None,
    ) -> LoraWeights:
        ranks = sorted({ad.rank for ad in adapters})
        if len(ranks) != 1:
            raise ValueError(
                f"this method merges A and B factor-wise and needs one rank, got ranks {ranks}; "
                "use cat, svd or a *_svd method for mixed ranks"
            )
        tensors: dict[str, torch.Tensor] = {}
        for module in module_order(adapters):
            present = _present(adapters, weights, module)
            scaled = [w * ad.scaling for ad, w in present]
            w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
            w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
            a_list = [ad.tensors[_a(module)].float() for ad, _ in present]
            b_list = [ad.tensors[_b(module)].float() for ad, _ in present]
            tensors[_a(module)] = combine(a_list, w_a, params, generator)
            tensors[_b(module)] = combine(b_list, w_b, params, generator)
        return LoraWeights(tensors=tensors, rank=ranks[0], lora_alpha=float(ranks[0]))

    merge.__doc__ = f"Factor-wise (A and B merged separately) with {combine.__name__}."
    return merge


def _dense(combine: Combine) -> MergeFn:
    def merge(
        adapters: Sequence[LoraWeights],
        weights: Sequence[float],
        params: Any,
        generator: torch.Generator | None,
    ) -> LoraWeights:
        rank = params.svd_rank or max(ad.rank for ad in adapters)
        tensors: dict[str, torch.Tensor] = {}
        for module in module_order(adapters):
            present = _present(adapters, weights, module)
            deltas = [ad.delta(module) for ad, _ in present]
            delta = combine(deltas, torch.tensor([w for _, w in present]), params, generator)
            a, b = svd_factor(
                delta, rank, params.svd_clamp, params.svd_full_matrices, params.svd_driver
            )
            tensors[_a(module)], tensors[_b(module)] = a, b
        return LoraWeights(tensors=tensors, rank=rank, lora_alpha=float(rank))

    merge.__doc__ = f"Dense: full ΔW combined with {combine.__name__}, then SVD to svd_rank."
    return merge


def _linear(ts: list[torch.Tensor], w: torch.Tensor, p: Any, g: Any) -> torch.Tensor:
    return tt.task_arithmetic(ts, w)


def _ties(ts: list[torch.Tensor], w: torch.Tensor, p: Any, g: Any) -> torch.Tensor:
    return tt.ties(ts, w, p.density, p.majority_sign_method)


def _dare_linear(ts: list[torch.Tensor], w: torch.Tensor, p: Any, g: Any) -> torch.Tensor:
    return tt.dare_linear(ts, w, p.density, g)


def _dare_ties(ts: list[torch.Tensor], w: torch.Tensor, p: Any, g: Any) -> torch.Tensor:
    return tt.dare_ties(ts, w, p.density, p.majority_sign_method, g)


def _magnitude_prune(ts: list[torch.Tensor], w: torch.Tensor, p: Any, g: Any) -> torch.Tensor:
    return tt.magnitude_prune(ts, w, p.density)


def _cat(
    adapters: Sequence[LoraWeights], weights: Sequence[float], params: Any, generator: Any
) -> LoraWeights:
    """Exact: A rows and B columns concatenated (weights and scalings in A), rank = sum of r."""
    return cat_merge(adapters, weights)


MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(_factorwise(_linear), NoParams),
    "cat": MergeMethod(_cat, NoParams),
    "svd": MergeMethod(_dense(_linear), SvdParams),
    "ties": MergeMethod(_factorwise(_ties), TiesParams),
    "ties_svd": MergeMethod(_dense(_ties), TiesSvdParams),
    "dare_linear": MergeMethod(_factorwise(_dare_linear), DareParams),
    "dare_linear_svd": MergeMethod(_dense(_dare_linear), DareSvdParams),
    "dare_ties": MergeMethod(_factorwise(_dare_ties), DareTiesParams),
    "dare_ties_svd": MergeMethod(_dense(_dare_ties), DareTiesSvdParams),
    "magnitude_prune": MergeMethod(_factorwise(_magnitude_prune), DensityParams),
    "magnitude_prune_svd": MergeMethod(_dense(_magnitude_prune), MagnitudePruneSvdParams),
}


def validate_params(method: str, params: Mapping[str, Any] | MergeParams | None) -> MergeParams:
    """The method's params model built from ``params``; ValueError naming the problem otherwise."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    model = MERGE_METHODS[method].params
    if isinstance(params, MergeParams):
        params = params.model_dump()
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'params'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"bad parameters for {method}: {problems}") from None


def merge_adapters(
    adapters: Sequence[LoraWeights],
    weights: Sequence[float],
    method: str,
    params: Mapping[str, Any] | MergeParams | None = None,
    generator: torch.Generator | None = None,
) -> LoraWeights:
    """Merge ``adapters`` with ``weights`` by ``method``, as PEFT's ``add_weighted_adapter`` does.

    Same arguments, same result: in particular, like PEFT, a *single* adapter is always merged
    with ``linear`` whatever the method (its parameters are still validated). DARE draws its masks
    from ``generator``, else from ``params.seed``, else from torch's global generator.
    Checking that the adapters belong to the same base model is the caller's job; mismatched
    module shapes raise ValueError here.
    """
    checked = validate_params(method, params)
    if not adapters or len(adapters) != len(weights):
        raise ValueError("need at least one adapter and exactly one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError("merge weights must be finite")
    check_shapes(adapters)
    if len(adapters) == 1:
        method, checked = "linear", NoParams()
    seed = getattr(checked, "seed", None)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return MERGE_METHODS[method].fn(adapters, weights, checked, generator)
