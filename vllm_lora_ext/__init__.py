"""vllm-lora-ext: serve, merge and migrate many LoRA adapters on one vLLM server."""

__version__ = "0.1.0"
