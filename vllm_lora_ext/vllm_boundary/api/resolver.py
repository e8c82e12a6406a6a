"""The store resolver: vLLM asks it for an adapter name it does not hold (API server).

Registered on ``OpenAIServingModels.lora_resolvers`` at start; it serves stored adapters on
their first request (after a restart, or registered by another replica) and inline merges
(``merge:…``), reading the files ahead so vLLM's ``add_lora`` does not stall the engine. Needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (``vllm-lora-ext serve`` sets it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vllm_lora_ext.vllm_boundary.api.engine import VllmEngineAdapters
from vllm_lora_ext.vllm_boundary.guards import Expect

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines

GUARDS = (
    Expect("vllm.lora.resolver", "LoRAResolver.resolve_lora", "the store resolver",
           params=("self", "base_model_name", "lora_name"), is_async=True),
    Expect("vllm.lora.request", "LoRARequest", "the resolver answers LoRARequest(name, id, path)",
           fields=("lora_name", "lora_int_id", "lora_path")),
)  # fmt: skip


def store_resolver(service: Any, engine: VllmEngineAdapters) -> Any:
    """A vLLM ``LoRAResolver`` that loads stored adapters on first request (e.g. after restart)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class StoreResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            from vllm_lora_ext.errors import Refused
            from vllm_lora_ext.server import metrics
            from vllm_lora_ext.server.adapters.inline_merges import is_merge

            try:
                if is_merge(lora_name):
                    path = await asyncio.to_thread(service.merges.materialise, lora_name)
                    service.merges.schedule_eviction(path)
                else:
                    record = service.get(lora_name)
                    if record is None:
                        return None
                    path = service.serving_path(record)
                    service.note_loaded(record)
            except Refused as e:
                metrics.VALIDATION_FAILURES.labels(reason=e.reason).inc()
                logger.warning("vllm-lora-ext: cannot serve %r: %s", lora_name, e.message)
                return None
            metrics.ADAPTER_LOADS.inc()
            # Read in the background, so vLLM's add_lora below does not stall the engine
            # (never raises: a load that does not happen ahead happens in add_lora).
            await engine.load_ahead(lora_name, str(path))
            # vLLM assigns the real int id after resolution.
            return LoRARequest(lora_name, 1, str(path))

    return StoreResolver()
