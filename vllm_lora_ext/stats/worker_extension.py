"""Methods the API process calls inside the vLLM worker (``collective_rpc``) to run captures.

Loaded with ``--worker-extension-cls vllm_lora_ext.stats.worker_extension.CaptureWorkerExtension``
(``vllm-lora-ext serve`` passes it). Results cross the process boundary as plain dicts and
safetensors bytes, never as live tensors.
"""

from __future__ import annotations

from typing import Any

from vllm_lora_ext.stats import capture_state
from vllm_lora_ext.stats.accumulators import InputStats, IterisStats
from vllm_lora_ext.stats.capture import CaptureRequest, TrafficCapture


class CaptureWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def _lora_ext_capture(self, memory_budget_bytes: int) -> TrafficCapture:
        from vllm_lora_ext.plugin import name_lora_layers

        current = capture_state.get()
        if current is not None:
            current.memory_budget_bytes = memory_budget_bytes
            return current
        layer_dims, slot_to_id = name_lora_layers(self)
        capture = TrafficCapture(layer_dims, memory_budget_bytes)
        capture_state.install(capture, slot_to_id)
        return capture

    def lora_ext_capture_start(self, request: dict[str, Any], memory_budget_bytes: int) -> dict:
        capture = self._lora_ext_capture(memory_budget_bytes)
        capture.start(CaptureRequest(**request))
        return _status(capture, request["lora_id"])

    def lora_ext_capture_stop(self, lora_id: int) -> dict:
        capture = capture_state.get()
        stopped = capture.stop(lora_id) if capture is not None else None
        return {"stopped": stopped is not None}

    def lora_ext_pin_cpu(self, lora_id: int) -> bool:
        """Pin an adapter in the CPU cache (not a batch slot): see ``plugin.pin_in_cpu_cache``."""
        from vllm_lora_ext.plugin import pin_in_cpu_cache

        return pin_in_cpu_cache(self, lora_id)

    def lora_ext_load_ahead(self, path: str, name: str) -> str:
        """Start reading an adapter in the background (``adapters/load_ahead``)."""
        from vllm_lora_ext.plugin import worker_load_ahead

        return worker_load_ahead(self, path, name)

    def lora_ext_load_state(self, path: str) -> str:
        from vllm_lora_ext.plugin import worker_load_state

        return worker_load_state(self, path)

    def lora_ext_residency(self) -> dict:
        """Adapter ids in a batch slot and in the CPU cache, and the load times."""
        from vllm_lora_ext.plugin import worker_residency

        return worker_residency(self)

    def lora_ext_capture_status(self) -> list[dict]:
        capture = capture_state.get()
        if capture is None:
            return []
        return [_status(capture, lora_id) for lora_id in capture.captures]

    def lora_ext_capture_export(self, lora_id: int, adapter: str) -> bytes | None:
        """The adapter's sums so far, as :class:`IterisStats` bytes under the name ``adapter``."""
        capture = capture_state.get()
        found = capture.captures.get(lora_id) if capture is not None else None
        if found is None:
            return None
        entries = {
            (adapter, layer): InputStats(xtx=gram.clone(), tokens=found.tokens[layer])
            for layer, gram in found.sums.items()
        }
        return IterisStats(entries).to_bytes()

    def lora_ext_record_start(
        self, lora_ids: list[int], targets: list[str], memory_budget_bytes: int
    ) -> None:
        self._lora_ext_capture(memory_budget_bytes).record_start(lora_ids, targets)

    def lora_ext_record_take(self, own_id: int, merged_id: int) -> bytes:
        """Paired sums of the rows recorded since the last take (safetensors bytes)."""
        from safetensors.torch import save

        capture = capture_state.get()
        if capture is None:
            raise ValueError("no recording runs")
        reduced = capture.record_take(own_id, merged_id)
        names = ("xtx", "cross", "merged", "rows")
        return save(
            {
                f"{layer}#{n}": t
                for layer, ts in reduced.items()
                for n, t in zip(names, ts, strict=True)
            }
        )

    def lora_ext_record_stop(self) -> None:
        capture = capture_state.get()
        if capture is not None:
            capture.record_stop()


def _status(capture: TrafficCapture, lora_id: int) -> dict:
    c = capture.captures[lora_id]
    return {
        "lora_id": lora_id,
        "captured_tokens": c.captured_tokens,
        "seen_tokens": c.seen_tokens,
        "token_budget": c.request.token_budget,
        "layers": len(c.layers),
        "bytes": c.nbytes(),
    }
