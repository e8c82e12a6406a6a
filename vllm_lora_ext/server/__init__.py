"""HTTP surface added to vLLM's OpenAI-compatible server (routes, schemas, metrics)."""
