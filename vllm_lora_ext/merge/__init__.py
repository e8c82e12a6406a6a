"""Merging adapters: pure functions on tensors (no vLLM, no HTTP)."""
