"""Kernel tests run on CPU under the Triton interpreter, made as strict as the GPU about tl.dot.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, before
any test module imports :mod:`lora_kernels`. The interpreter's builder accepts any ``tl.dot``
shape (its ``min_dot_size`` returns (1, 1, 1)); we install the NVIDIA backend's own function
for sm_90 so a tile the GPU would reject (e.g. K < 16 for fp16, K < 8 for fp32) fails here.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import min_dot_size
from triton.runtime.interpreter import interpreter_builder

HOPPER = GPUTarget("cuda", 90, 32)


def strict_dot_sizes(target: GPUTarget):
    """The NVIDIA backend's tl.dot minimums, and Triton 3.6's too (the GPU host's version):
    3.6 refuses fp32 dots with K < 16 where 3.9 allows K >= 8."""
    newest = min_dot_size(target)

    def check(lhs_type, rhs_type) -> tuple[int, int, int]:
        m, n, k = newest(lhs_type, rhs_type)
        return (m, n, max(k, 16)) if lhs_type.scalar.primitive_bitwidth == 32 else (m, n, k)

    return check


interpreter_builder.codegen_fns["min_dot_size"] = strict_dot_sizes(HOPPER)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
