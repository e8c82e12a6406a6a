"""What runs inside the vLLM worker: its functions and the worker extension.

:class:`LoraExtWorkerExtension` is mixed into vLLM's worker class by
``--worker-extension-cls vllm_lora_ext.vllm_boundary.worker.LoraExtWorkerExtension``
(``vllm-lora-ext serve`` passes it); the API process calls its ``lora_ext_*`` methods with
``collective_rpc`` (:mod:`.api.engine`): traffic capture, CPU-cache pins, loads ahead,
residency. Results cross the process boundary as plain dicts and safetensors bytes, never as
live tensors. The capture itself (pure torch) lives in ``stats/``.
"""

from __future__ import annotations

from typing import Any

from vllm_lora_ext.stats import capture_state
from vllm_lora_ext.stats.accumulators import InputStats, IterisStats
from vllm_lora_ext.stats.capture import CaptureRequest, TrafficCapture
from vllm_lora_ext.vllm_boundary.guards import Expect

GUARDS = (
    Expect("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin",
           "worker functions reach the LoRA manager as model_runner.lora_manager",
           assigns=("lora_manager",)),
    Expect("vllm.lora.worker_manager", "WorkerLoRAManager",
           "worker functions read its _adapter_manager", assigns=("_adapter_manager",)),
    Expect("vllm.lora.worker_manager", "WorkerLoRAManager.list_adapters",
           "loads ahead skip cached adapters", accepts=("self",)),
    Expect("vllm.lora.model_manager", "LRUCacheLoRAModelManager.pin_adapter",
           "CPU-cache pins avoid vLLM's pin, which also takes a batch slot",
           contains=("_pin_lora_in_gpu_cache",)),
    Expect("vllm.utils.cache", "LRUCache.pin", "CPU-cache pins", accepts=("self", "key")),
    Expect("vllm.v1.worker.worker_base", "WorkerWrapperBase", "--worker-extension-cls",
           contains=("worker_extension_cls",)),
)  # fmt: skip

_AHEAD_PLACEHOLDER_ID = 2**31 - 1  # a load ahead has no int id yet; the step sets the real one
_ahead: Any = None  # this worker's AheadLoader
AHEAD_PATHS: dict[int, str] = {}
"""lora int id -> path, for the adapters this worker loaded (``patches.patch_worker_lora_loading``
fills it)."""


def ahead_loader(manager: Any) -> Any:
    """The worker's :class:`AheadLoader`, loading with vLLM's own (unpatched) loader."""
    global _ahead
    if _ahead is None:
        from vllm.lora.request import LoRARequest
        from vllm.lora.worker_manager import WorkerLoRAManager

        from vllm_lora_ext.adapters.load_ahead import AheadLoader

        original = WorkerLoRAManager._load_adapter.__wrapped__

        def load(path: str, name: str) -> Any:
            return original(manager, LoRARequest(name, _AHEAD_PLACEHOLDER_ID, path))

        _ahead = AheadLoader(load)
    return _ahead


def load_ahead(worker: Any, path: str, name: str) -> str:
    """Start loading ``path`` in the background unless the CPU cache holds it: ``cached``, or
    the loader's state (``loading``, ``ready``, ``failed``)."""
    manager = worker.model_runner.lora_manager
    if any(AHEAD_PATHS.get(i) == path for i in manager.list_adapters()):
        return "cached"
    return ahead_loader(manager).start(path, name)


def load_state(worker: Any, path: str) -> str:
    return ahead_loader(worker.model_runner.lora_manager).state(path)


def residency(worker: Any) -> dict[str, Any]:
    """Adapter ids in a batch slot and in the CPU cache, and the worker's load times."""
    manager = worker.model_runner.lora_manager
    slots = [i for i in manager._adapter_manager.lora_index_to_id if i is not None]
    return {
        "slots": slots,
        "cached": sorted(manager.list_adapters()),
        "loads": ahead_loader(manager).report(),
    }


def name_lora_layers(worker: Any) -> tuple[dict[str, int], list[int | None]]:
    """Tag the worker's LoRA linear layers with their names; return {name: input width} and
    vLLM's live slot -> LoRA id table."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    manager = worker.model_runner.lora_manager._adapter_manager
    dims: dict[str, int] = {}
    for name, module in manager.modules.items():
        if isinstance(module, BaseLinearLayerWithLoRA):
            module._lora_ext_name = name
            dims[name] = int(module.lora_a_stacked[0].shape[-1])
    return dims, manager.lora_index_to_id


def pin_in_cpu_cache(worker: Any, lora_id: int) -> bool:
    """Keep a loaded adapter in the worker's CPU cache (``--max-cpu-loras``, LRU) for good.

    Not vLLM's ``pin_lora``: that also pins one of the ``--max-loras`` batch slots, which the
    scheduler does not know about, so a batch of ``max_loras`` other adapters would evict one
    of its own members from its slot. False when the adapter is not cached (evicted meanwhile).
    """
    cache = worker.model_runner.lora_manager._adapter_manager._registered_adapters
    if lora_id not in cache:
        return False
    cache.pin(lora_id)
    return True


class LoraExtWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def _lora_ext_capture(self, memory_budget_bytes: int) -> TrafficCapture:
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
        """Pin an adapter in the CPU cache (not a batch slot): :func:`pin_in_cpu_cache`."""
        return pin_in_cpu_cache(self, lora_id)

    def lora_ext_load_ahead(self, path: str, name: str) -> str:
        """Start reading an adapter in the background (``adapters/load_ahead``)."""
        return load_ahead(self, path, name)

    def lora_ext_load_state(self, path: str) -> str:
        return load_state(self, path)

    def lora_ext_residency(self) -> dict:
        """Adapter ids in a batch slot and in the CPU cache, and the load times."""
        return residency(self)

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
