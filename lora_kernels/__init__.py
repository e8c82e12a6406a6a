"""Triton kernels for batched multi-LoRA, rank-exact per slot (no vLLM imports)."""
