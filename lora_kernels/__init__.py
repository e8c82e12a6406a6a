"""Triton kernels for batched multi-LoRA and merged-delta application (no vLLM imports)."""
