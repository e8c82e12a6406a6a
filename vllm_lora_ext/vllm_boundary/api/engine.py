"""The engine bridge: the API server's side of vLLM's engine, as our services see it.

:class:`VllmEngineAdapters` is :class:`~vllm_lora_ext.server.adapters.service.EngineAdapters` on
vLLM's ``OpenAIServingModels`` and engine client; :class:`VllmCaptureEngine` is
:class:`~vllm_lora_ext.server.stats.service.CaptureEngine`: the worker extension's methods
(:mod:`..worker`) through ``collective_rpc``. Runs in the API server process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vllm_lora_ext.vllm_boundary.guards import Expect

UNLOAD_DRAIN_SECONDS = 120.0
LOAD_AHEAD_SECONDS = 30.0  # past this a request goes on, and its step loads the adapter

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines

_SERVING = "vllm.entrypoints.openai.models.serving"
_ASYNC_LLM = "vllm.v1.engine.async_llm"
_OUTPUTS = "vllm.v1.engine.output_processor"
GUARDS = (
    Expect(_SERVING, "OpenAIServingModels.__init__", "the bridge reads vLLM's adapter table",
           assigns=("lora_requests", "lora_resolvers", "lora_resolver_lock",
                    "base_model_paths")),
    Expect(_SERVING, "OpenAIServingModels.load_lora_adapter", "the bridge loads through vLLM",
           accepts=("self", "request"), is_async=True),
    Expect("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest",
           "the bridge loads through vLLM", fields=("lora_name", "lora_path")),
    Expect("vllm.entrypoints.serve.engine.protocol", "ErrorResponse",
           "the bridge reads vLLM's load errors"),
    Expect(_ASYNC_LLM, "AsyncLLM.__init__", "unload finds the requests on an adapter",
           contains=("self.output_processor = OutputProcessor(",)),
    Expect(_OUTPUTS, "OutputProcessor.__init__", "unload finds the requests on an adapter",
           assigns=("request_states",)),
    Expect(_OUTPUTS, "RequestState.__init__", "unload finds the requests on an adapter",
           assigns=("lora_request",)),
    Expect(_ASYNC_LLM, "AsyncLLM.abort", "unload aborts what outlives the drain",
           keywords=("internal",), is_async=True),
    Expect(_ASYNC_LLM, "AsyncLLM.remove_lora", "unload frees the slot",
           accepts=("self", "lora_id"), is_async=True),
    Expect(_ASYNC_LLM, "AsyncLLM.add_lora", "prefetch and pins",
           accepts=("self", "lora_request"), is_async=True),
    Expect(_ASYNC_LLM, "AsyncLLM.list_loras", "what the CPU cache holds", is_async=True),
    Expect(_ASYNC_LLM, "AsyncLLM.collective_rpc", "calls into the worker extension",
           keywords=("method", "args"), is_async=True),
    Expect(_ASYNC_LLM, "AsyncLLM.errored", "jobs stop with the engine", is_property=True),
)  # fmt: skip


class VllmEngineAdapters:
    """:class:`EngineAdapters` on top of the API server's ``OpenAIServingModels``.

    Loading goes through vLLM's own ``load_lora_adapter`` so its bookkeeping (``/v1/models``,
    name -> int id) stays the single source of truth for what is loaded.
    """

    def __init__(
        self,
        serving_models: Any,
        engine_client: Any,
        drain: Callable[[str, float], Awaitable[bool]],
    ) -> None:
        self.serving_models = serving_models
        self.engine_client = engine_client
        self.drain = drain
        """Waits for the HTTP requests admitted for a name so far (ForwardTable.drain)."""
        self.resident_paths: set[str] = set()
        """Adapter paths in the worker's CPU cache, as far as this process knows."""
        self.ahead_enabled = True

    async def load(self, name: str, path: Path) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        await self.load_ahead(name, str(path))  # add_lora below then does not read the files
        result = await self.serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path))
        )
        if isinstance(result, ErrorResponse):
            # Once committed to the store, a request for it may resolve and load it first.
            held = self.serving_models.lora_requests.get(name)
            if held is None or held.lora_path != str(path):
                raise RuntimeError(result.error.message)

    async def settle(self, name: str, timeout: float = UNLOAD_DRAIN_SECONDS) -> None:
        """Wait for the requests admitted for ``name`` so far (before it is hidden or unloaded:
        a request admitted before a delete or a rollback's flip is still served)."""
        await self.drain(name, timeout)

    async def unload(self, name: str, drain_timeout: float = UNLOAD_DRAIN_SECONDS) -> bool:
        """Forget ``name``, let the requests admitted for it finish, then free its slot.

        The name goes under the resolver's per-name lock, as in vLLM's own unload: a resolve in
        flight (resolved, awaiting ``add_lora``) finishes first and cannot re-add the name after
        we looked; it was seen to, leaving a deleted adapter served. vLLM's unload only forgets
        the name; ``remove_lora`` frees the engine's slot and CPU cache. A request still
        running on a removed adapter makes the worker reload it from its path, gone after a
        delete: the engine died of that. Requests still running after ``drain_timeout`` are
        aborted.
        """
        async with self.serving_models.lora_resolver_lock[name]:
            request = self.serving_models.lora_requests.pop(name, None)
        if request is None:
            return False
        self.resident_paths.discard(request.lora_path)
        if not await self.drain(name, drain_timeout):
            running = self._requests_using(request.lora_int_id)
            logger.warning("vllm-lora-ext: aborting %d requests on %r", len(running), name)
            await self.engine_client.abort(running, internal=True)
        await self.engine_client.remove_lora(request.lora_int_id)
        logger.info("vllm-lora-ext: unloaded %r", name)
        return True

    async def load_ahead(self, name: str, path: str) -> None:
        """Have the worker read ``path`` into memory in the background, and wait for it, so the
        engine step that first needs the adapter does not (see ``adapters/load_ahead``).

        Nothing is asked when the last residency report (or an earlier load ahead) placed the
        path in the CPU cache; a failed or slow load leaves the step to load it, as before.
        """
        if path in self.resident_paths or not self.ahead_enabled:
            return
        deadline = time.monotonic() + LOAD_AHEAD_SECONDS
        try:
            state = await self._rpc("lora_ext_load_ahead", path, name)
            while state == "loading" and time.monotonic() < deadline:
                await asyncio.sleep(0.002)  # each call waits for the engine's current step
                state = await self._rpc("lora_ext_load_state", path)
        except Exception as e:  # e.g. a worker without our extension: load in the step
            if self.engine_client.errored:
                return
            self.ahead_enabled = False
            logger.warning("vllm-lora-ext: no loads ahead on this server: %s", e)
            return
        if state in ("cached", "ready"):
            self.resident_paths.add(path)

    async def load_ahead_resolved(self, name: str) -> None:
        """:meth:`load_ahead` for an adapter vLLM resolved before (a first request's adapter
        is loaded ahead by the store resolver instead)."""
        request = self.serving_models.lora_requests.get(name)
        if request is not None:
            await self.load_ahead(name, request.lora_path)

    async def residency(self) -> dict[str, Any]:
        """Names in a batch slot and in the CPU cache now, and the worker's load times; also
        refreshes what :meth:`load_ahead` takes as resident."""
        report = await self._rpc("lora_ext_residency")
        by_id = {r.lora_int_id: r for r in self.serving_models.lora_requests.values()}
        names = {
            k: [by_id[i].lora_name for i in report[k] if i in by_id] for k in ("slots", "cached")
        }
        self.resident_paths = {by_id[i].lora_path for i in report["cached"] if i in by_id}
        return {**names, "loads": report["loads"]}

    async def _rpc(self, method: str, *args: Any) -> Any:
        return (await self.engine_client.collective_rpc(method, args=args))[0]

    def _requests_using(self, lora_int_id: int) -> list[str]:
        """Internal ids of the engine's unfinished requests on this adapter id."""
        states = self.engine_client.output_processor.request_states
        return [
            request_id
            for request_id, state in list(states.items())
            if state.lora_request is not None and state.lora_request.lora_int_id == lora_int_id
        ]

    def loaded_names(self) -> set[str]:
        return set(self.serving_models.lora_requests)

    async def prefetch(self, name: str, path: Path) -> None:
        """Into the worker's CPU cache now, as a first request would (vLLM's ``add_lora``);
        also brings back an adapter the LRU evicted."""
        request = self.serving_models.lora_requests.get(name)
        if request is None:
            await self.load(name, path)
        else:
            await self.engine_client.add_lora(request)

    async def pin(self, name: str) -> None:
        request = self.serving_models.lora_requests[name]
        for _ in range(3):  # traffic may evict it between add_lora and the pin: add again
            await self.engine_client.add_lora(request)
            pinned = await self.engine_client.collective_rpc(
                "lora_ext_pin_cpu", args=(request.lora_int_id,)
            )
            if all(pinned):
                return
        raise RuntimeError(f"{name!r} was evicted from the CPU cache before it could be pinned")

    async def cached_names(self) -> set[str]:
        """Adapters in the worker's CPU cache now."""
        ids = await self.engine_client.list_loras()
        return {n for n, r in self.serving_models.lora_requests.items() if r.lora_int_id in ids}


class VllmCaptureEngine:
    """:class:`CaptureEngine`: the worker extension's methods through ``collective_rpc``."""

    def __init__(self, serving_models: Any, engine_client: Any, memory_budget_bytes: int) -> None:
        self.serving_models = serving_models
        self.engine_client = engine_client
        self.memory_budget_bytes = memory_budget_bytes

    async def lora_id(self, name: str) -> int:
        return int(self.serving_models.lora_requests[name].lora_int_id)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            results = await self.engine_client.collective_rpc(method, args=args)
        except Exception as e:
            # The worker's exception arrives wrapped; keep its message, drop vLLM's frames.
            raise ValueError(str(e).strip().splitlines()[-1] if str(e) else repr(e)) from e
        return results[0]

    async def start(self, request: dict[str, Any], memory_budget_bytes: int) -> dict:
        return await self._call("lora_ext_capture_start", request, memory_budget_bytes)

    async def stop(self, lora_id: int) -> dict:
        return await self._call("lora_ext_capture_stop", lora_id)

    async def status(self) -> list[dict]:
        return await self._call("lora_ext_capture_status")

    async def export(self, lora_id: int, adapter: str) -> bytes | None:
        return await self._call("lora_ext_capture_export", lora_id, adapter)

    async def record_start(self, lora_ids: list[int], targets: list[str]) -> None:
        await self._call("lora_ext_record_start", lora_ids, targets, self.memory_budget_bytes)

    async def record_take(self, own_id: int, merged_id: int) -> bytes:
        return await self._call("lora_ext_record_take", own_id, merged_id)

    async def record_stop(self) -> None:
        await self._call("lora_ext_record_stop")
