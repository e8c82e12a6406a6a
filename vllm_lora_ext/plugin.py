"""vLLM's entry points into this package: the engine bridge, the store resolver, the patches.

vLLM is imported here and in the punica wrappers that vLLM instantiates by name
(``cpu_lora/punica_wrapper.py``, ``gpu_lora/``), nowhere else: ruff's banned-import rule
(``TID251``, ``pyproject.toml``) enforces it. Everything vLLM-specific (``LoRARequest``,
resolvers, engine args, the LoRA manager) is used against the pinned version below;
``tests/unit/test_plugin_guard`` fails loudly if a vLLM upgrade moves any of it. ``cli.py``
starts vLLM's server module by name, as a subprocess, and imports nothing of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from argparse import Namespace
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

SUPPORTED_VLLM_VERSION = "0.32.0"
PLUGIN_NAME = "lora_ext"
UNLOAD_DRAIN_SECONDS = 120.0
LOAD_AHEAD_SECONDS = 30.0  # past this a request goes on, and its step loads the adapter

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines
_registered = False


def register() -> None:
    """``vllm.general_plugins`` entry point; runs in every vLLM process, possibly repeatedly."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM_VERSION:
        logger.warning(
            "vllm-lora-ext is built against vLLM %s, found %s; its integration may break",
            SUPPORTED_VLLM_VERSION,
            vllm.__version__,
        )
    from vllm.platforms import current_platform

    from vllm_lora_ext.settings import Settings

    patch_lora_layer_capture()
    patch_worker_lora_loading()
    patch_request_service_levels()
    if current_platform.is_cpu():
        patch_cpu_lora_shrink()
        select_cpu_punica_wrapper(type(current_platform))
        cpu_punica = Settings().cpu_punica
        if cpu_punica == "ours":
            patch_cpu_live_ranks()
        if cpu_punica == "lora_kernels":
            # Before any module of lora_kernels is imported: @triton.jit reads it then.
            os.environ["TRITON_INTERPRET"] = "1"
            patch_slot_ranks()
    elif current_platform.is_cuda():
        select_gpu_punica_wrapper(type(current_platform))
        patch_slot_ranks()


OUR_CPU_PUNICA = "vllm_lora_ext.cpu_lora.punica_wrapper.GroupedPunicaWrapperCPU"
OUR_GPU_PUNICA = "vllm_lora_ext.gpu_lora.punica_wrapper.LoraKernelsPunicaWrapperGPU"
OUR_INTERPRETED_PUNICA = "vllm_lora_ext.gpu_lora.interpreted.LoraKernelsPunicaWrapperInterpreted"


def select_cpu_punica_wrapper(platform_cls: type) -> None:
    """Serve LoRA on CPU with our grouped wrapper unless ``VLLM_LORA_EXT_CPU_PUNICA=vllm``
    (``=lora_kernels``: our GPU path, interpreted, for tests)."""
    choices = {"ours": OUR_CPU_PUNICA, "lora_kernels": OUR_INTERPRETED_PUNICA}
    _select_punica_wrapper(platform_cls, lambda s: choices.get(s.cpu_punica))


def select_gpu_punica_wrapper(platform_cls: type) -> None:
    """On CUDA, ``VLLM_LORA_EXT_GPU_PUNICA=ours`` serves LoRA with :mod:`lora_kernels`; the
    default stays vLLM's Triton ops until our kernels have been measured on a GPU."""
    _select_punica_wrapper(
        platform_cls, lambda s: OUR_GPU_PUNICA if s.gpu_punica == "ours" else None
    )


def _select_punica_wrapper(platform_cls: type, choose) -> None:
    """vLLM picks the wrapper by ``current_platform.get_punica_wrapper()`` (a qualname); the
    setting is read when the worker builds its LoRA manager, so one env var flips it."""
    original = platform_cls.get_punica_wrapper
    if getattr(original, "_vllm_lora_ext", False):
        return

    def get_punica_wrapper(cls) -> str:
        from vllm_lora_ext.settings import Settings

        return choose(Settings()) or original()

    get_punica_wrapper._vllm_lora_ext = True  # type: ignore[attr-defined]
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)


def patch_slot_ranks() -> None:
    """Tell the punica wrapper the rank of the adapter each slot holds, when vLLM fills it.

    vLLM pads every slot to ``max_lora_rank`` and its wrappers never learn the real ranks; ours
    (``set_slot_rank``) then computes each slot with its own rank. ``activate_adapter`` is
    where vLLM's LoRA manager writes an adapter into a slot (``lora_index_to_id[index]``).
    """
    from vllm.lora.model_manager import LoRAModelManager

    original = LoRAModelManager.activate_adapter
    if getattr(original, "_vllm_lora_ext", False):
        return

    def activate_adapter(self, lora_id: int) -> bool:
        result = original(self, lora_id)
        rank = self._registered_adapters[lora_id].rank
        index = self.lora_index_to_id.index(lora_id)
        for wrapper in self.punica_wrapper_mapping.values():
            if hasattr(wrapper, "set_slot_rank"):
                wrapper.set_slot_rank(index, rank)
        return result

    activate_adapter._vllm_lora_ext = True  # type: ignore[attr-defined]
    activate_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    LoRAModelManager.activate_adapter = activate_adapter


def patch_cpu_live_ranks() -> None:
    """When vLLM writes an adapter into a slot, note per module slice how many of the slot's
    rank rows are live (``segment_ops.note_live_ranks``): the grouped CPU path then skips the
    modules the adapter does not target and the padding up to ``--max-lora-rank``.

    vLLM allocates every slot for every LoRA-capable module at ``max_lora_rank`` and fills the
    rest with zeros; a rank-8 q/v adapter in a rank-16 slot of a Llama layer is 2 live slices of
    7, at half their rank. ``activate_adapter`` is where vLLM's LoRA manager fills a slot.
    """
    from vllm.lora.model_manager import LoRAModelManager

    from vllm_lora_ext.cpu_lora.segment_ops import note_live_ranks

    original = LoRAModelManager.activate_adapter
    if getattr(original, "_vllm_lora_ext_live", False):
        return

    def activate_adapter(self, lora_id: int) -> bool:
        result = original(self, lora_id)
        if result:  # False: already in a slot (vLLM calls this for every adapter every step)
            index = self.lora_index_to_id.index(lora_id)
            for module in self.modules.values():
                a, b = (
                    getattr(module, "lora_a_stacked", None),
                    getattr(module, "lora_b_stacked", None),
                )
                if isinstance(a, tuple | list) and isinstance(b, tuple | list):
                    note_live_ranks(a, b, index)
        return result

    activate_adapter._vllm_lora_ext_live = True  # type: ignore[attr-defined]
    activate_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    LoRAModelManager.activate_adapter = activate_adapter


def patch_cpu_lora_shrink() -> None:
    """Make vLLM's CPU LoRA ops leave base-model tokens (adapter index -1) untouched.

    vLLM 0.32's torch ops gather ``lora_a[indices]``; index -1 wraps to the *last* slot, so
    when every ``max_loras`` slot is occupied, base-model requests batched with adapter
    requests are served with the last slot's adapter. Zeroing the shrink output of those rows
    makes the following expand add ``B @ 0 = 0``. Idempotent; guarded by a test that tells
    us when vLLM's own op stops needing it.
    """
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    original = lora_ops.bgmv_shrink
    if getattr(original, "_vllm_lora_ext_masked", False):
        return

    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        output_tensor[lora_indices_tensor < 0] = 0

    bgmv_shrink._vllm_lora_ext_masked = True  # type: ignore[attr-defined]
    bgmv_shrink.__wrapped__ = original  # type: ignore[attr-defined]
    # sgmv_shrink (prefill) calls lora_ops.bgmv_shrink; the CPU wrapper calls its own import.
    lora_ops.bgmv_shrink = bgmv_shrink
    punica_cpu.bgmv_shrink = bgmv_shrink


def patch_lora_layer_capture() -> None:
    """Hand every LoRA linear layer's input to the traffic capture (a no-op while none runs).

    ``_apply_lora_to_output`` is where vLLM 0.32's unsharded LoRA linear layers (column, merged
    qkv / gate-up, row, replicated) meet their input ``x`` and the batch's per-token adapter
    slots. Not reached by fully-sharded LoRA layers, the dual-stream CUDA path, or inside CUDA
    graphs: on GPU, capture needs ``--enforce-eager``.
    """
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    original = BaseLinearLayerWithLoRA._apply_lora_to_output
    if getattr(original, "_vllm_lora_ext", False):
        return
    from vllm_lora_ext.stats import capture_state

    def _apply_lora_to_output(self, x, output):
        name = getattr(self, "_lora_ext_name", None)
        if name is not None:
            capture_state.observe(name, x, self.punica_wrapper.token_lora_indices)
        return original(self, x, output)

    _apply_lora_to_output._vllm_lora_ext = True  # type: ignore[attr-defined]
    _apply_lora_to_output.__wrapped__ = original  # type: ignore[attr-defined]
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output


_AHEAD_PLACEHOLDER_ID = 2**31 - 1  # a load ahead has no int id yet; the step sets the real one
_ahead: Any = None  # this worker's AheadLoader
_ahead_paths: dict[int, str] = {}  # lora int id -> path, for the adapters this worker loaded


def patch_worker_lora_loading() -> None:
    """Let the engine step take an adapter the worker loaded ahead (``adapters/load_ahead``).

    ``WorkerLoRAManager._load_adapter`` is where vLLM 0.32 reads an adapter's files, called by
    ``add_adapter`` for a batch's adapter missing from the CPU cache and by ``add_lora``.
    """
    from vllm.lora.worker_manager import WorkerLoRAManager

    original = WorkerLoRAManager._load_adapter
    if getattr(original, "_vllm_lora_ext", False):
        return

    def _load_adapter(self, lora_request):
        path = lora_request.lora_path
        lora = ahead_loader(self).take(path, lambda: original(self, lora_request))
        lora.id = lora_request.lora_int_id
        _ahead_paths[lora.id] = path
        return lora

    _load_adapter._vllm_lora_ext = True  # type: ignore[attr-defined]
    _load_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    WorkerLoRAManager._load_adapter = _load_adapter


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


def worker_load_ahead(worker: Any, path: str, name: str) -> str:
    """Start loading ``path`` in the background unless the CPU cache holds it: ``cached``, or
    the loader's state (``loading``, ``ready``, ``failed``)."""
    manager = worker.model_runner.lora_manager
    if any(_ahead_paths.get(i) == path for i in manager.list_adapters()):
        return "cached"
    return ahead_loader(manager).start(path, name)


def worker_load_state(worker: Any, path: str) -> str:
    return ahead_loader(worker.model_runner.lora_manager).state(path)


def worker_residency(worker: Any) -> dict[str, Any]:
    """Adapter ids in a batch slot and in the CPU cache, and the worker's load times."""
    manager = worker.model_runner.lora_manager
    slots = [i for i in manager._adapter_manager.lora_index_to_id if i is not None]
    return {
        "slots": slots,
        "cached": sorted(manager.list_adapters()),
        "loads": ahead_loader(manager).report(),
    }


def patch_request_service_levels() -> None:
    """Observe each finished request's TTFT and time per output token under its adapter.

    ``OutputProcessor._update_stats_from_finished`` (API server process, vLLM 0.32) is where a
    finished request's state still carries both its adapter name and vLLM's own timestamps,
    the ones behind ``vllm:time_to_first_token_seconds``.
    """
    from vllm.v1.engine.output_processor import OutputProcessor

    original = OutputProcessor._update_stats_from_finished
    if getattr(original, "_vllm_lora_ext", False):
        return

    def _update_stats_from_finished(self, req_state, finish_reason, iteration_stats):
        original(self, req_state, finish_reason, iteration_stats)
        stats = req_state.stats
        if stats is None or stats.num_generation_tokens == 0:
            return
        from vllm_lora_ext.server.service_levels import SERVICE_LEVELS

        n = stats.num_generation_tokens
        tpot = (stats.last_token_ts - stats.first_token_ts) / (n - 1) if n > 1 else None
        SERVICE_LEVELS.observe(req_state.lora_name, stats.first_token_latency, tpot)

    _update_stats_from_finished._vllm_lora_ext = True  # type: ignore[attr-defined]
    _update_stats_from_finished.__wrapped__ = original  # type: ignore[attr-defined]
    OutputProcessor._update_stats_from_finished = _update_stats_from_finished


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


def _store_resolver(service: Any, engine: VllmEngineAdapters) -> Any:
    """A vLLM ``LoRAResolver`` that loads stored adapters on first request (e.g. after restart)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class StoreResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            from vllm_lora_ext.errors import Refused
            from vllm_lora_ext.merge.spec import PREFIX
            from vllm_lora_ext.server import metrics

            try:
                if lora_name.startswith(PREFIX):
                    path = await asyncio.to_thread(service.materialise_merge, lora_name)
                    service.schedule_merged_eviction(path)
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


class LoraExtEndpointPlugin:
    """``vllm.endpoint_plugins`` entry point: the ``/v1/adapters`` routes and request metrics."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm_lora_ext.errors import Refused
        from vllm_lora_ext.server.adapters.routes import router
        from vllm_lora_ext.server.gateway import GenerationGateway
        from vllm_lora_ext.server.http import refused_handler
        from vllm_lora_ext.server.merges.routes import router as merge_router
        from vllm_lora_ext.server.migrations.routes import router as migration_router
        from vllm_lora_ext.server.stats.routes import router as stats_router

        app.include_router(router)
        app.include_router(stats_router)
        app.include_router(merge_router)
        app.include_router(migration_router)
        app.add_exception_handler(Refused, refused_handler)
        app.add_middleware(GenerationGateway)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from vllm_lora_ext.adapters.base_model import BaseModelInfo
        from vllm_lora_ext.adapters.store import AdapterStore
        from vllm_lora_ext.server.adapters.service import AdapterService
        from vllm_lora_ext.server.merges.jobs import MergeJobs
        from vllm_lora_ext.server.merges.replay import HttpReplayer
        from vllm_lora_ext.server.migrations.forwarding import ForwardTable
        from vllm_lora_ext.server.stats.service import StatsService
        from vllm_lora_ext.settings import Settings

        state.lora_ext = None
        state.lora_ext_stats = None
        state.lora_ext_merges = None
        state.lora_ext_migrations = None
        state.lora_ext_forward = None
        if engine_client is None or not getattr(args, "enable_lora", False):
            logger.warning("vllm-lora-ext: LoRA is disabled; /v1/adapters answers 409")
            return
        settings = Settings()
        serving_models = state.openai_serving_models
        model_config = engine_client.model_config
        base = BaseModelInfo.from_hf_config(
            name=serving_models.base_model_paths[0].name,
            config=model_config.hf_config,
            aliases=[
                *(p.name for p in serving_models.base_model_paths),
                model_config.model,
                *settings.base_aliases,
            ],
        )
        store = AdapterStore(settings.resolved_store_dir())
        state.lora_ext_forward = ForwardTable()
        engine = VllmEngineAdapters(serving_models, engine_client, state.lora_ext_forward.drain)
        engine.ahead_enabled = settings.load_ahead
        state.lora_ext = AdapterService(
            store=store,
            base=base,
            max_rank=int(args.max_lora_rank),
            engine=engine,
            max_upload_bytes=settings.max_upload_bytes,
            # A full batch of unpinned adapters must still fit in the CPU cache.
            max_pinned=int(getattr(args, "max_cpu_loras", None) or args.max_loras)
            - int(args.max_loras),
            inline_merges=settings.inline_merges,
            merged_cache_bytes=settings.merged_cache_bytes,
            allowed_paths=settings.allowed_adapter_paths,
        )
        serving_models.lora_resolvers.append(_store_resolver(state.lora_ext, engine))
        await state.lora_ext.pin_at_start(settings.pinned_adapters)
        capture = VllmCaptureEngine(serving_models, engine_client, settings.stats_memory_bytes)
        state.lora_ext_stats = StatsService(
            adapters=state.lora_ext,
            engine=capture,
            memory_budget_bytes=settings.stats_memory_bytes,
            reservoir_size=settings.stats_reservoir_size,
            stats_dir=settings.stats_dir,
        )
        await state.lora_ext.evict_merged()  # the budget may have shrunk since last start
        from vllm_lora_ext.server.service_levels import SERVICE_LEVELS

        SERVICE_LEVELS.top_n = settings.metrics_top_adapters
        state.lora_ext_residency = asyncio.create_task(
            follow_residency(engine, state.lora_ext, engine_client, settings.residency_poll_seconds)
        )
        host = args.host if args.host not in (None, "", "0.0.0.0", "::") else "127.0.0.1"
        self_url, api_key = f"http://{host}:{args.port}", served_api_key(args)

        def stopping() -> bool:  # the engine is gone: jobs failing now were interrupted
            return bool(engine_client.errored)

        replayer = HttpReplayer(
            self_url, capture, state.lora_ext, Path(model_config.model), api_key=api_key
        )
        state.lora_ext_merges = MergeJobs(
            state.lora_ext,
            state.lora_ext_stats,
            replayer,
            server_stopping=stopping,
        )
        await _init_migrations(
            state,
            settings,
            Path(model_config.model),
            self_url,
            base.name,
            api_key,
            stopping,
        )
        logger.info(
            "vllm-lora-ext: store %s, %d adapters for base %s",
            store.root,
            len(state.lora_ext.names),
            base.name,
        )


async def follow_residency(
    engine: VllmEngineAdapters, service: Any, engine_client: Any, every: float
) -> None:
    """Keep the residency and load-time metrics current (and what loads ahead skip)."""
    from vllm_lora_ext.server.service_levels import SERVICE_LEVELS

    while not engine_client.errored:
        try:
            report = await engine.residency()
        except Exception as e:
            if engine_client.errored:
                return
            logger.warning("vllm-lora-ext: no residency metrics on this server: %s", e)
            return
        SERVICE_LEVELS.set_residency(report["slots"], report["cached"], service.names)
        SERVICE_LEVELS.set_loads(report["loads"])
        await asyncio.sleep(every)


def served_api_key(args: Namespace) -> str | None:
    """The key this server's ``/v1`` routes require, by vLLM's own rule: ``--api-key`` (the
    first, if several) before ``VLLM_API_KEY``; None when the server is open."""
    from vllm import envs

    return next((k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k), None)


async def _init_migrations(
    state: Any,
    settings: Any,
    new_base: Path,
    self_url: str,
    base_name: str,
    api_key: str | None,
    server_stopping: Callable[[], bool],
) -> None:
    """The migration service; with ``serve --migrate-from`` its job starts before serving, and a
    refused one stops the server with the reason (an operator asked for it explicitly)."""
    from vllm_lora_ext.errors import Refused
    from vllm_lora_ext.server.migrations.jobs import (
        MigrationJobs,
        MigrationRequest,
        known_model_finder,
    )

    jobs = MigrationJobs(
        state.lora_ext,
        state.lora_ext_forward,
        new_base,
        known_model_finder(settings.cache_dir),
        self_url,
        base_name,
        api_key=api_key,
        server_stopping=server_stopping,
    )
    state.lora_ext_migrations = jobs
    if settings.migrate_from is None:
        return
    body = json.loads(settings.migrate_request.read_text()) if settings.migrate_request else {}
    body["source_url"] = settings.migrate_from
    if settings.migrate_source_model is not None:
        body["source_model_path"] = str(settings.migrate_source_model)
    try:
        job = await jobs.submit(MigrationRequest.model_validate(body))
    except Refused as e:
        raise RuntimeError(f"vllm-lora-ext: --migrate-from {settings.migrate_from}: {e}") from e
    logger.info("vllm-lora-ext: migration %s of %d adapters started from %s", job.id,
                len(job.adapters), settings.migrate_from)  # fmt: skip
