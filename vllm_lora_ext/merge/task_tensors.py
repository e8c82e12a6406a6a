"""Combining K same-shape "task tensors" into one: the elementwise core of the classic merges.

Each function takes the K tensors and a float32 ``weights`` vector and returns one tensor of the
same shape. They follow PEFT's ``utils/merge_utils.py`` conventions exactly (same pruning rule,
same sign election, same operation order), because the merges built on them promise PEFT parity:

- magnitude pruning keeps the ``int(density * numel)`` largest |values| of each tensor;
- DARE keeps each value with probability ``density`` and divides survivors by ``density``;
- TIES elects a sign per element (``total``: sign of the sum; ``frequency``: sign of the count;
  ties go to +), then averages the *weighted* values that agree with it over the number of
  tensors that agree (not over K, and not weighted by the weights).

Functions and arguments carry PEFT's names (``magnitude_based_pruning``, ``random_pruning``,
``prune``, ``calculate_majority_sign_mask``, ``disjoint_merge``, ``task_arithmetic``, ...), so a
reader comparing the two finds each by name. Ours differ in two ways: DARE's draws take a
``generator`` (``None``: torch's global one, as PEFT draws), and ``prune`` at density >= 1
returns the tensor without PEFT's warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` [K] viewed as [K, 1, ...] to broadcast over stacked ``task_tensors`` [K, ...]."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _weighted(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return task_tensors * reshape_weight_task_tensors(task_tensors, weights)


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def random_pruning(
    tensor: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep each entry with probability ``density``; with ``rescale`` (DARE) survivors are
    divided by ``density``, so the expectation is kept.

    The mask is one ``torch.bernoulli`` draw of the tensor's shape, as PEFT draws it, so the same
    generator state gives PEFT's mask (``generator=None`` uses torch's global generator).
    """
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(
    tensor: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``magnitude_based_pruning`` or ``random_pruning``; density >= 1 keeps the tensor."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale, generator)


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: SignMethod = "total"
) -> torch.Tensor:
    """Boolean mask of the entries of ``tensor`` [K, ...] whose sign agrees with the
    per-element majority sign over K."""
    sign = tensor.sign()
    magnitude = tensor.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors that agree with the elected sign (at least 1 in the denominator)."""
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k t_k``."""
    return _weighted(torch.stack(list(task_tensors), dim=0), weights).sum(dim=0)


def magnitude_prune(
    task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """``sum_k w_k magnitude_based_pruning(t_k)``."""
    return task_arithmetic([prune(t, density, "magnitude") for t in task_tensors], weights)


def ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """Magnitude-prune each tensor, elect signs on the unweighted pruned tensors, disjoint mean."""
    stacked = torch.stack([prune(t, density, "magnitude") for t in task_tensors], dim=0)
    mask = calculate_majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sum_k w_k dare(t_k)``; masks drawn in tensor order."""
    pruned = [prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors]
    return task_arithmetic(pruned, weights)


def dare_ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE each tensor, then TIES's sign election and disjoint mean."""
    pruned = [prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors]
    stacked = torch.stack(pruned, dim=0)
    mask = calculate_majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)
