"""Start-up in the API server: the services built on vLLM's engine, as one typed state.

:func:`init_state` is the endpoint plugin's ``init_state``: it checks what the bridge and the
resolver expect of vLLM (:data:`GUARDS`), builds the adapter service on the engine bridge, the
statistics, merge and migration services, registers the store resolver, starts the residency
poll, and installs the :class:`~vllm_lora_ext.server.state.LoraExtState` as ``app.state.lora_ext``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.store import AdapterStore
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.jobs.runners import JobRunner, make_runner
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.merges.jobs import MergeJobs
from vllm_lora_ext.server.merges.replay import HttpReplayer
from vllm_lora_ext.server.migrations.forwarding import ForwardTable
from vllm_lora_ext.server.migrations.job import MigrationRequest
from vllm_lora_ext.server.migrations.jobs import MigrationJobs, known_model_finder
from vllm_lora_ext.server.service_levels import SERVICE_LEVELS
from vllm_lora_ext.server.state import LoraExtState, install
from vllm_lora_ext.server.stats.service import StatsService
from vllm_lora_ext.settings import Settings
from vllm_lora_ext.vllm_boundary.api import engine, resolver
from vllm_lora_ext.vllm_boundary.api.engine import VllmCaptureEngine, VllmEngineAdapters
from vllm_lora_ext.vllm_boundary.guards import Expect, require

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines

GUARDS = (
    *engine.GUARDS,
    *resolver.GUARDS,
    Expect("vllm.entrypoints.launchers.api_server.app_state", "",
           "the plugin's init_state finds vLLM's OpenAIServingModels on the app state",
           contains=("state.openai_serving_models = OpenAIServingModels(",)),
    Expect("vllm.envs", "", "the server's own API key (VLLM_API_KEY)",
           contains=('"VLLM_API_KEY": lambda',)),
    Expect("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.init_state",
           "the endpoint plugin", params=("self", "engine_client", "state", "args"),
           is_async=True),
    Expect("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.attach_router",
           "the endpoint plugin", params=("self", "app")),
    Expect("vllm.entrypoints.launchers.api_server.entry", "main",
           "vllm-lora-ext serve starts this module"),
)  # fmt: skip


async def init_state(engine_client: Any, app_state: Any, args: Namespace) -> None:
    from vllm import __version__ as vllm_version

    install(app_state, None)
    if engine_client is None or not getattr(args, "enable_lora", False):
        logger.warning("vllm-lora-ext: LoRA is disabled; /v1/adapters answers 409")
        return
    require(GUARDS, vllm_version)
    settings = Settings()
    serving_models = app_state.openai_serving_models
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
    forward = ForwardTable()
    bridge = VllmEngineAdapters(serving_models, engine_client, forward.drain)
    bridge.ahead_enabled = settings.load_ahead
    adapters = AdapterService(
        store=store,
        base=base,
        max_rank=int(args.max_lora_rank),
        engine=bridge,
        max_upload_bytes=settings.max_upload_bytes,
        # A full batch of unpinned adapters must still fit in the CPU cache.
        max_pinned=int(getattr(args, "max_cpu_loras", None) or args.max_loras)
        - int(args.max_loras),
        inline_merges=settings.inline_merges,
        merged_cache_bytes=settings.merged_cache_bytes,
        allowed_paths=settings.allowed_adapter_paths,
    )
    state = LoraExtState(adapters=adapters, forward=forward)
    install(app_state, state)
    serving_models.lora_resolvers.append(resolver.store_resolver(adapters, bridge))
    await adapters.pin_at_start(settings.pinned_adapters)
    capture = VllmCaptureEngine(serving_models, engine_client, settings.stats_memory_bytes)
    state.stats = StatsService(
        adapters=adapters,
        engine=capture,
        memory_budget_bytes=settings.stats_memory_bytes,
        reservoir_size=settings.stats_reservoir_size,
        stats_dir=settings.stats_dir,
    )
    await adapters.merges.evict()  # the budget may have shrunk since last start
    SERVICE_LEVELS.top_n = settings.metrics_top_adapters
    state.residency = asyncio.create_task(
        follow_residency(bridge, adapters, engine_client, settings.residency_poll_seconds)
    )
    host = args.host if args.host not in (None, "", "0.0.0.0", "::") else "127.0.0.1"
    self_url, api_key = f"http://{host}:{args.port}", served_api_key(args)

    def stopping() -> bool:  # the engine is gone: jobs failing now were interrupted
        return bool(engine_client.errored)

    replayer = HttpReplayer(self_url, capture, adapters, Path(model_config.model), api_key=api_key)
    runner = make_runner(settings.job_runner, **settings.job_runner_kwargs())
    state.merges = MergeJobs(
        adapters, state.stats, replayer, server_stopping=stopping, runner=runner
    )
    await _init_migrations(
        state, settings, Path(model_config.model), self_url, base.name, api_key, stopping, runner
    )
    logger.info(
        "vllm-lora-ext: store %s, %d adapters for base %s",
        store.root,
        len(adapters.names),
        base.name,
    )


async def follow_residency(
    bridge: VllmEngineAdapters, service: AdapterService, engine_client: Any, every: float
) -> None:
    """Keep the residency and load-time metrics current (and what loads ahead skip)."""
    while not engine_client.errored:
        try:
            report = await bridge.residency()
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
    state: LoraExtState,
    settings: Settings,
    new_base: Path,
    self_url: str,
    base_name: str,
    api_key: str | None,
    server_stopping: Callable[[], bool],
    runner: JobRunner,
) -> None:
    """The migration service; with ``serve --migrate-from`` its job starts before serving, and a
    refused one stops the server with the reason (an operator asked for it explicitly)."""
    jobs = MigrationJobs(
        state.adapters,
        state.forward,
        new_base,
        known_model_finder(settings.cache_dir),
        self_url,
        base_name,
        api_key=api_key,
        server_stopping=server_stopping,
        runner=runner,
    )
    state.migrations = jobs
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
