"""Our GPU LoRA path inside a real vLLM server on CPU, with the kernels interpreted.

The machines that build and test this project have no GPU. With
``VLLM_LORA_EXT_CPU_PUNICA=lora_kernels`` the CPU server's LoRA linear layers run exactly the
code of :class:`~vllm_lora_ext.gpu_lora.punica_wrapper.LoraKernelsPunicaWrapperGPU` (its
metadata, custom op, rank-exact slots and kernels) under ``TRITON_INTERPRET=1``, which
``vllm_boundary.patches.apply`` sets before the kernels are imported; embeddings and logits
stay on vLLM's CPU ops. It is for tests: interpreted kernels cost ~2 ms per program.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from vllm_lora_ext.gpu_lora.punica_wrapper import KernelLinearPath


class LoraKernelsPunicaWrapperInterpreted(KernelLinearPath, PunicaWrapperCPU):
    def __init__(
        self,
        max_num_batched_tokens: int,
        max_batches: int,
        device: torch.device | str,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._init_kernel_buffers(max_num_batched_tokens, device, kwargs["lora_config"].max_loras)
