"""The multi-LoRA kernels' test kit: problems, tolerances, the float64 reference, vLLM's ops.

Written once, imported by ``tests/unit/kernels`` and the kernel benchmarks alike
(``benchmarks/gpu_check.py``, ``kernel_tune.py``, ``vllm_lora_ops.py``). It imports torch and
triton only: the lent GPU host has no vLLM and no pydantic. vLLM's ops come in as an argument
(:class:`VllmOps`): the copy ``benchmarks/vllm_lora_ops.py`` vendors for that host, or the
installed vLLM's own ops re-jitted for the interpreter (:func:`interpreted_vllm_ops`).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

TESTED_TRITON = "3.9.0"
"""The Triton the kernel tests run under (pinned in pyproject.toml, dev); the GPU host has 3.6."""

TOLERANCES = {
    # Interpreter: fp32 dots are exact fp32.
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    # t = x Aᵀ is rounded to fp16 before the expand dot (as on the GPU) and y is stored in fp16;
    # values are O(1), so 5e-3 is ~10 ulps.
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    # GPU only (the interpreter computes bf16 wrongly): ~8 bf16 ulps.
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}
GPU_FP16_SLACK = 2.0
"""On a GPU, fp16 tensor cores accumulate in another order than the interpreter."""
ORACLE_TOLERANCE = dict(atol=2e-2, rtol=2e-2)
"""Ours against vLLM's ops (both fp16, different tiling and rounding of ``t``)."""


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, float]:
    tol = TOLERANCES[dtype]
    if torch.device(device).type == "cuda" and dtype == torch.float16:
        return {k: v * GPU_FP16_SLACK for k, v in tol.items()}
    return tol


@dataclass
class Problem:
    """One multi-LoRA application: inputs, weights, the batch's slots, and a poisoned output."""

    x: torch.Tensor  # [T, H]
    lora_a: list[torch.Tensor]  # per slice [slots, R_max, H] (vLLM: [slots, 1, R_max, H])
    lora_b: list[torch.Tensor]  # per slice [slots, N_s, R_max] (vLLM: [slots, 1, N_s, R_max])
    idx: torch.Tensor  # [T] int32 slot of each token, -1 = base model only
    ranks: torch.Tensor  # [slots] int32
    scales: torch.Tensor  # [slots] fp32
    y0: torch.Tensor  # [T, N_y] prefilled known values ("poison")
    offset_start: int = 0
    live_ranks: torch.Tensor | None = None  # [slices, slots] int32: 0 = slice not targeted

    def fresh_y(self) -> torch.Tensor:
        return self.y0.clone()

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b.shape[-2] for b in self.lora_b)

    @property
    def hidden(self) -> int:
        return self.x.shape[1]

    @property
    def slots(self) -> int:
        return self.ranks.shape[0]

    @property
    def r_max(self) -> int:
        return self.lora_a[0].shape[-2]

    def vllm_layout(self) -> Problem:
        """The same problem with vLLM's 4-d stacks ``[slots, 1, ...]``."""
        if self.lora_a[0].dim() == 4:
            return self
        return replace(
            self,
            lora_a=[a.unsqueeze(1) for a in self.lora_a],
            lora_b=[b.unsqueeze(1) for b in self.lora_b],
        )


def make_problem(
    dtype: torch.dtype,
    num_tokens: int,
    ranks: Sequence[int],
    sizes: tuple[int, ...] = (40, 24, 8),
    hidden: int = 96,
    offset_start: int = 3,
    tail: int = 5,
    idx: torch.Tensor | None = None,
) -> Problem:
    """Ragged ranks, weights padded to the max rank with *nonzero* junk past each adapter's
    rank, a poisoned output with columns left and right of the slices (global RNG).

    vLLM pads with zeros, which would hide a kernel that reads past ``rank_i``; junk there
    makes such a kernel wrong by O(1). ``idx``: random over the slots and -1 unless given.
    """
    slots, r_max = len(ranks), max(ranks)
    x = torch.randn(num_tokens, hidden).to(dtype)
    lora_a = [(torch.randn(slots, r_max, hidden) / hidden**0.5).to(dtype) for _ in sizes]
    lora_b = [(torch.randn(slots, n, r_max) / r_max**0.5).to(dtype) for n in sizes]
    scales = torch.rand(slots) * 1.5 + 0.25
    y0 = torch.randn(num_tokens, offset_start + sum(sizes) + tail).to(dtype)
    if idx is None:
        idx = torch.randint(-1, slots, (num_tokens,))
    return Problem(x, lora_a, lora_b, idx.to(torch.int32),
                   torch.tensor(ranks, dtype=torch.int32), scales, y0, offset_start)  # fmt: skip


def make_batch(
    hidden: int,
    sizes: tuple[int, ...],
    num_tokens: int,
    active: int,
    rank: int,
    slots: int,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Problem:
    """A served batch as vLLM holds it: ``slots`` stacks ``[slots, 1, rank, H]``, ``active``
    adapters drawn among them, tokens spread round-robin over those, scale 1, output zeros; one
    generator on ``device`` seeded with ``seed`` (the benchmarks' cases)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    a = [randn(slots, 1, rank, hidden, scale=hidden**-0.5) for _ in sizes]
    b = [randn(slots, 1, n, rank, scale=rank**-0.5) for n in sizes]
    chosen = torch.randperm(slots, generator=g, device=device)[:active]
    idx = chosen[torch.arange(num_tokens, device=device) % active].to(torch.int32)
    x = randn(num_tokens, hidden, scale=1.0)
    y0 = torch.zeros(num_tokens, sum(sizes), dtype=dtype, device=device)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=device)
    return Problem(x, a, b, idx, ranks, torch.ones(slots, device=device), y0)


def multi_lora_ref(
    y: torch.Tensor,  # [T, N_y]
    x: torch.Tensor,  # [T, H]
    lora_a: Sequence[torch.Tensor],  # per slice [slots, R_max, H] or [slots, 1, R_max, H]
    lora_b: Sequence[torch.Tensor],  # per slice [slots, N_s, R_max] or [slots, 1, N_s, R_max]
    adapter_idx: torch.Tensor,  # [T]
    ranks: torch.Tensor,  # [slots]
    scales: torch.Tensor,  # [slots]
    offset_start: int = 0,
    live_ranks: torch.Tensor | None = None,  # [slices, slots]; 0 = slice not targeted
) -> torch.Tensor:
    """float64 reference of :func:`lora_kernels.multi_lora.multi_lora`; a new ``y`` (on the
    CPU; the input is untouched)."""
    out = y.detach().cpu().to(torch.float64).clone()
    xd = x.detach().cpu().to(torch.float64)
    ranks, scales = ranks.cpu(), scales.cpu()
    live = live_ranks.cpu() if live_ranks is not None else None
    for t, i in enumerate(adapter_idx.tolist()):
        if i < 0:
            continue
        off = offset_start
        for s, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            r = int(ranks[i]) if live is None else min(int(ranks[i]), int(live[s, i]))
            a_i = a.reshape(a.shape[0], *a.shape[-2:])[i].cpu()
            b_i = b.reshape(b.shape[0], *b.shape[-2:])[i].cpu()
            delta = (xd[t] @ a_i[:r].double().T) @ b_i[:, :r].double().T * float(scales[i])
            out[t, off : off + b_i.shape[0]] += delta
            off += b_i.shape[0]
    return out


def reference(p: Problem, **override: Any) -> torch.Tensor:
    """:func:`multi_lora_ref` of a problem (``override``: fields replaced, e.g. ``idx``)."""
    p = replace(p, **override) if override else p
    return multi_lora_ref(p.y0, p.x, p.lora_a, p.lora_b, p.idx, p.ranks, p.scales,
                          p.offset_start, p.live_ranks)  # fmt: skip


def assert_matches(y: torch.Tensor, ref: torch.Tensor, p: Problem) -> None:
    """Within tolerance of the float64 reference, and bit-identical wherever nothing applies:
    rows without an adapter, columns left and right of the slices."""
    tol = tolerance(y.dtype, y.device)
    y = y.cpu()
    y0 = p.y0.cpu()
    torch.testing.assert_close(y.double(), ref, **tol)
    touched = p.idx.cpu() >= 0
    end = p.offset_start + sum(p.sizes)
    assert torch.equal(y[~touched], y0[~touched]), "rows without an adapter changed"
    assert torch.equal(y[:, : p.offset_start], y0[:, : p.offset_start]), "left of slices"
    assert torch.equal(y[:, end:], y0[:, end:]), "right of the last slice changed"
    if touched.any():
        # The tolerance must be able to fail: the delta is far larger than it.
        delta = (ref - y0.double())[touched, p.offset_start : end]
        assert delta.abs().max() > 20 * (tol["atol"] + tol["rtol"] * ref.abs().max())


# -- vLLM's ops as a second oracle --------------------------------------------------------------


class VllmOps:
    """What the oracle needs of vLLM's Triton LoRA ops (``vllm/lora/ops/triton_ops``):
    ``lora_shrink``, ``lora_expand``, ``LoRAKernelMeta`` and ``utils`` (pointer caches)."""

    lora_shrink: Callable[..., None]
    lora_expand: Callable[..., None]
    LoRAKernelMeta: Any
    utils: Any


def small_grid_config(op_type: str, **shape: int) -> dict[str, int | None]:
    """vLLM's op config with one split and wide blocks: the interpreter pays ~2 ms per
    program, not per FLOP (the code path is what runs there, not the tuning)."""
    return {
        "block_m": 16, "block_n": 32, "block_k": 64, "split_k": 1, "num_warps": 4,
        "num_ctas": 1, "num_stages": 1, "group_size_m": 8, "max_nreg": None,
    }  # fmt: skip


def vllm_apply(ops: VllmOps, p: Problem, y: torch.Tensor, scale: float = 1.0) -> Callable[[], None]:
    """A closure doing what vLLM's ``PunicaWrapperGPU.add_lora_linear`` does on ``p`` into
    ``y``: shrink to an fp32 buffer, then expand. vLLM's ops know no per-slot rank or scale:
    every slot at ``R_max``, one ``scale``."""
    p = p.vllm_layout()
    ops.utils._LORA_A_PTR_DICT.clear()  # keyed by data_ptr; fresh problems reuse addresses
    ops.utils._LORA_B_PTR_DICT.clear()
    tokens, device = p.x.shape[0], p.x.device
    meta = ops.LoRAKernelMeta.make(p.slots, tokens, device=device)
    meta.prepare_tensors(p.idx)
    args = meta.meta_args(tokens, True)
    buf = torch.empty(len(p.sizes), tokens, p.r_max, dtype=torch.float32, device=device)

    def run() -> None:
        ops.lora_shrink(p.x, p.lora_a, buf, *args, scale)
        ops.lora_expand(buf, p.lora_b, y, *args, offset_start=p.offset_start, add_inputs=True)

    return run


def _rejit(fn: types.FunctionType, extra: dict[str, object]) -> object:
    import triton
    import triton.language as tl

    globs = dict(fn.__globals__)
    globs.update(triton=triton, tl=tl, **extra)
    clone = types.FunctionType(fn.__code__, globs, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__, clone.__module__ = fn.__qualname__, fn.__module__
    return triton.jit(clone)


@contextmanager
def interpreted_vllm_ops(
    kernel_utils: Any, lora_shrink_op: Any, lora_expand_op: Any, utils: Any, meta_cls: Any
) -> Iterator[VllmOps]:
    """vLLM's own ops, from its modules (``vllm.lora.ops.triton_ops.*``, passed in: this kit
    imports no vLLM), running on interpreted kernels for the duration.

    On the CPU build ``vllm.triton_utils`` finds no Triton driver and swaps ``triton`` / ``tl``
    for placeholders, so ``@triton.jit`` there is a no-op and the kernels are plain functions
    whose globals point at the placeholders. Their code is untouched upstream code: the same
    function objects are rebound to the real ``triton.language`` and wrapped with the real
    (interpreting) ``triton.jit``, and vLLM's launchers pointed at them.
    """
    helpers: dict[str, object] = {"mm_k": _rejit(kernel_utils.mm_k, {})}
    for name in ("do_expand_kernel", "do_shrink_kernel"):
        helpers[name] = _rejit(getattr(kernel_utils, name), helpers)
    import triton

    patched = {
        lora_shrink_op: {
            "_lora_shrink_kernel": _rejit(lora_shrink_op._lora_shrink_kernel, helpers),
            "triton": triton,
            "get_lora_op_configs": small_grid_config,
        },
        lora_expand_op: {
            "_lora_expand_kernel": _rejit(lora_expand_op._lora_expand_kernel, helpers),
            "triton": triton,
            "get_lora_op_configs": small_grid_config,
        },
    }
    saved = {mod: {k: getattr(mod, k) for k in attrs} for mod, attrs in patched.items()}
    ops = VllmOps()
    ops.lora_shrink, ops.lora_expand = lora_shrink_op._lora_shrink, lora_expand_op._lora_expand
    ops.LoRAKernelMeta, ops.utils = meta_cls, utils
    try:
        for mod, attrs in patched.items():
            for k, v in attrs.items():
                setattr(mod, k, v)
        yield ops
    finally:
        for mod, attrs in saved.items():
            for k, v in attrs.items():
                setattr(mod, k, v)
        utils._LORA_A_PTR_DICT.clear()
        utils._LORA_B_PTR_DICT.clear()
