"""The CPU LoRA path: tokens grouped by adapter, one dense matmul per group (no vLLM in ops)."""
