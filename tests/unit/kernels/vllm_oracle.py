"""vLLM 0.32's own ``lora_shrink`` / ``lora_expand`` made runnable under the Triton interpreter.

On the CPU build ``vllm.triton_utils`` finds no active Triton driver and swaps ``triton`` /
``tl`` for placeholders, so ``@triton.jit`` there is a no-op and the kernels are plain Python
functions whose globals point at the placeholders. Their code is untouched upstream code: we
rebind the same function objects to the real ``triton.language`` and wrap them with the real
(interpreting) ``triton.jit``, then point vLLM's launchers at them for the duration of a test.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import triton
import triton.language as tl


def _small_grid_config(op_type: str, **shape: int) -> dict[str, int | None]:
    """One split and wide blocks: the interpreter pays ~2 ms per program, not per FLOP."""
    return {
        "block_m": 16, "block_n": 32, "block_k": 64, "split_k": 1, "num_warps": 4,
        "num_ctas": 1, "num_stages": 1, "group_size_m": 8, "max_nreg": None,
    }  # fmt: skip


def _rejit(fn: types.FunctionType, extra: dict[str, object]) -> object:
    globs = dict(fn.__globals__)
    globs.update(triton=triton, tl=tl, **extra)
    clone = types.FunctionType(fn.__code__, globs, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__, clone.__module__ = fn.__qualname__, fn.__module__
    return triton.jit(clone)


@contextmanager
def vllm_triton_lora_ops() -> Iterator[tuple[object, object]]:
    """Yield vLLM's ``(_lora_shrink, _lora_expand)`` launchers running on interpreted kernels."""
    from vllm.lora.ops.triton_ops import kernel_utils, lora_expand_op, lora_shrink_op, utils

    helpers: dict[str, object] = {}
    helpers["mm_k"] = _rejit(kernel_utils.mm_k, {})
    for name in ("do_expand_kernel", "do_shrink_kernel"):
        helpers[name] = _rejit(getattr(kernel_utils, name), helpers)
    patched = {
        lora_shrink_op: {
            "_lora_shrink_kernel": _rejit(lora_shrink_op._lora_shrink_kernel, helpers),
            "triton": triton,
            "get_lora_op_configs": _small_grid_config,
        },
        lora_expand_op: {
            "_lora_expand_kernel": _rejit(lora_expand_op._lora_expand_kernel, helpers),
            "triton": triton,
            "get_lora_op_configs": _small_grid_config,
        },
    }
    saved = {mod: {k: getattr(mod, k) for k in attrs} for mod, attrs in patched.items()}
    try:
        for mod, attrs in patched.items():
            for k, v in attrs.items():
                setattr(mod, k, v)
        # Pointer tables are cached by data_ptr; freed test tensors reuse addresses.
        utils._LORA_A_PTR_DICT.clear()
        utils._LORA_B_PTR_DICT.clear()
        yield lora_shrink_op._lora_shrink, lora_expand_op._lora_expand
    finally:
        for mod, attrs in saved.items():
            for k, v in attrs.items():
                setattr(mod, k, v)
        utils._LORA_A_PTR_DICT.clear()
        utils._LORA_B_PTR_DICT.clear()
