"""Combining K same-shape "task tensors" into one: the elementwise core of the classic merges.

Each function takes the K tensors and a float32 ``weights`` vector and returns one tensor of the
same shape. They follow PEFT's ``utils/merge_utils.py`` conventions exactly (same pruning rule,
same sign election, same operation order), because the merges built on them promise PEFT parity:

- magnitude pruning keeps the ``int(density * numel)`` largest |values| of each tensor;
- DARE keeps each value with probability ``density`` and divides survivors by ``density``;
- TIES elects a sign per element (``total``: sign of the sum; ``frequency``: sign of the count;
  ties go to +), then averages the *weighted* values that agree with it over the number of
  tensors that agree (not over K, and not weighted by the weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def _stack_weighted(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(list(tensors), dim=0)
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries (density >= 1: keep)."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def prune_random(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled so the expectation is kept.

    The mask is one ``torch.bernoulli`` draw of the tensor's shape, as PEFT draws it, so the same
    generator state gives PEFT's mask (``generator=None`` uses torch's global generator).
    """
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def elect_sign(stacked: torch.Tensor, method: SignMethod) -> torch.Tensor:
    """Boolean mask of the entries whose sign agrees with the per-element majority sign."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors that agree with the elected sign (at least 1 in the denominator)."""
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k t_k`` (task arithmetic)."""
    return _stack_weighted(tensors, weights).sum(dim=0)


def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """``sum_k w_k prune_magnitude(t_k)``."""
    return linear([prune_magnitude(t, density) for t in tensors], weights)


def ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float, sign: SignMethod
) -> torch.Tensor:
    """Magnitude-prune each tensor, elect signs on the unweighted pruned tensors, disjoint mean."""
    stacked = torch.stack([prune_magnitude(t, density) for t in tensors], dim=0)
    agree = elect_sign(stacked, sign)
    return disjoint_mean(_stack_weighted(stacked, weights), agree)


def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``sum_k w_k dare(t_k)``; masks drawn in tensor order."""
    return linear([prune_random(t, density, generator) for t in tensors], weights)


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    sign: SignMethod,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DARE each tensor, then TIES's sign election and disjoint mean."""
    stacked = torch.stack([prune_random(t, density, generator) for t in tensors], dim=0)
    agree = elect_sign(stacked, sign)
    return disjoint_mean(_stack_weighted(stacked, weights), agree)
