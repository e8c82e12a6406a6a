"""The GPU LoRA path: vLLM's punica wrapper routed to the :mod:`lora_kernels` Triton kernels."""
