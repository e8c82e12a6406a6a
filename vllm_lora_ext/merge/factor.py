"""Dense ΔW -> rank-r LoRA factors, and rank truncation of factors that are already a LoRA."""

from __future__ import annotations

import torch


def svd_factor(
    delta: torch.Tensor,  # [out, in]
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation.

    PEFT's convention (``_svd_generalized_task_arithmetic_weighted_adapter``): the singular values
    go into B (``B = U S``, ``A = Vh``); with ``clamp`` (a quantile in [0, 1]) both factors are
    clipped to ±(that quantile of all their entries together). The SVD runs in ``delta``'s dtype.
    A ``rank`` above ``min(out, in)`` (where PEFT breaks) is exact and zero-padded to ``rank``.
    """
    k = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    b = u[:, :k] @ torch.diag(s[:k])
    a = vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b = b.clamp(-hi, hi)
        a = a.clamp(-hi, hi)
    return _zero_pad(a, b, rank)


def _zero_pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` [k, in] and ``b`` [out, k] padded with zero rows / columns up to ``rank``: the same
    product, at the rank the caller asked for."""
    k = a.shape[0]
    if k >= rank:
        return a, b
    a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b


def truncate_factors(
    a: torch.Tensor,  # [r, in]
    b: torch.Tensor,  # [out, r]
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``b @ a``, and the relative Frobenius error of the cut.

    Works on the r x r core (QR of both factors) so the dense [out, in] matrix is never formed.
    A ``rank`` at or above ``r`` keeps everything (zero-padded up to ``rank``; error 0).
    Returns ``(A [rank, in], B [out, rank], ||BA - B'A'||_F / ||BA||_F)``.
    """
    r = a.shape[0]
    if rank >= r:
        return (*_zero_pad(a, b, rank), 0.0)
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.shape[0])  # fewer singular values than rank when a side is narrower than r
    a_out, b_out = _zero_pad(vh[:k] @ qa.T, qb @ (u[:, :k] * s[:k]), rank)
    total = float(s.square().sum())
    dropped = float(s[k:].square().sum())
    error = (dropped / total) ** 0.5 if total > 0 else 0.0
    return a_out, b_out, error
