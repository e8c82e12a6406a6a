"""LoRA adapters: the PEFT on-disk format, validation against the served base, the store."""
