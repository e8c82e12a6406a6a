"""The worker process's one capture, read by the hook ``vllm_boundary/patches.py`` puts on
vLLM's LoRA layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_lora_ext.stats.capture import TrafficCapture

_capture: TrafficCapture | None = None
_slot_to_id: Sequence[int | None] = ()


def install(capture: TrafficCapture, slot_to_id: Sequence[int | None]) -> None:
    """``slot_to_id`` is vLLM's live slot table (mutated in place as adapters come and go)."""
    global _capture, _slot_to_id
    _capture, _slot_to_id = capture, slot_to_id


def get() -> TrafficCapture | None:
    return _capture


def observe(layer: str, x: torch.Tensor, token_slots: torch.Tensor) -> None:
    """Hot path: a no-op unless a capture is running."""
    if _capture is not None and _capture.active:
        _capture.observe(layer, x.view(-1, x.shape[-1]), token_slots, _slot_to_id)
