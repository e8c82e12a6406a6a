"""Random multi-LoRA problems and the checks every kernel test shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp16: t = x Aᵀ is rounded to fp16 before the expand dot (as on the GPU) and y is stored in
# fp16; values are O(1), so 5e-3 is ~10 ulps. fp32: the interpreter's dots are exact fp32.
TESTED_TRITON = "3.9.0"  # pinned in pyproject.toml (dev); the lent GPU host has 3.6
TOLERANCES = {torch.float16: dict(atol=5e-3, rtol=5e-3), torch.float32: dict(atol=2e-5, rtol=2e-5)}


@dataclass
class Problem:
    x: torch.Tensor  # [T, H]
    lora_a: list[torch.Tensor]  # per slice [slots, R_max, H]
    lora_b: list[torch.Tensor]  # per slice [slots, N_s, R_max]
    ranks: torch.Tensor  # [slots] int32
    scales: torch.Tensor  # [slots] fp32
    y0: torch.Tensor  # [T, N_y] poison: prefilled known values
    offset_start: int

    def y(self) -> torch.Tensor:
        return self.y0.clone()


def make_problem(
    dtype: torch.dtype,
    num_tokens: int,
    ranks: list[int],
    sizes: tuple[int, ...] = (40, 24, 8),
    hidden: int = 96,
    offset_start: int = 3,
    tail: int = 5,
) -> Problem:
    """Weights padded to max rank with *nonzero* junk past each adapter's rank.

    vLLM pads with zeros, which would hide a kernel that reads past ``rank_i``; junk there
    makes such a kernel wrong by O(1).
    """
    slots, r_max = len(ranks), max(ranks)
    x = torch.randn(num_tokens, hidden).to(dtype)
    lora_a = [(torch.randn(slots, r_max, hidden) / hidden**0.5).to(dtype) for _ in sizes]
    lora_b = [(torch.randn(slots, n, r_max) / r_max**0.5).to(dtype) for n in sizes]
    scales = torch.rand(slots) * 1.5 + 0.25
    y0 = torch.randn(num_tokens, offset_start + sum(sizes) + tail).to(dtype)
    return Problem(
        x, lora_a, lora_b, torch.tensor(ranks, dtype=torch.int32), scales, y0, offset_start
    )


def assert_matches(
    y: torch.Tensor, ref: torch.Tensor, p: Problem, touched_rows: torch.Tensor
) -> None:
    """Within tolerance of the float64 reference, and bit-identical wherever nothing applies."""
    tol = TOLERANCES[y.dtype]
    torch.testing.assert_close(y.double(), ref, **tol)
    end = p.offset_start + sum(b.shape[-2] for b in p.lora_b)
    untouched = ~touched_rows
    assert torch.equal(y[untouched], p.y0[untouched]), "rows without an adapter changed"
    assert torch.equal(y[:, : p.offset_start], p.y0[:, : p.offset_start]), "left of slices"
    assert torch.equal(y[:, end:], p.y0[:, end:]), "right of the last slice changed"
    if touched_rows.any():
        # The tolerance must be able to fail: the delta is far larger than it.
        delta = (ref - p.y0.double())[touched_rows, p.offset_start : end]
        assert delta.abs().max() > 20 * (tol["atol"] + tol["rtol"] * ref.abs().max())
