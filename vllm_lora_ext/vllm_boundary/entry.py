"""What vLLM loads by entry point (``pyproject.toml``), both named ``lora_ext`` in
``VLLM_PLUGINS``.

- :func:`register` (``vllm.general_plugins``) runs in every vLLM process (API server, engine
  core, worker), possibly more than once: it checks what the patches and the worker functions
  expect of the installed vLLM, failing loudly, then applies the patches.
- :class:`LoraExtEndpointPlugin` (``vllm.endpoint_plugins``, API server) adds our routes and
  the gateway, and builds the services at start (:mod:`.api.state`).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from vllm_lora_ext.vllm_boundary import GUARDED_VLLM_LINES, PLUGIN_NAME

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines
_registered = False


def register() -> None:
    """``vllm.general_plugins`` entry point; runs in every vLLM process, possibly repeatedly."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm.platforms import current_platform

    from vllm_lora_ext.settings import Settings
    from vllm_lora_ext.vllm_boundary import patches, worker
    from vllm_lora_ext.vllm_boundary.guards import require

    require((*patches.GUARDS, *worker.GUARDS), vllm.__version__)
    if ".".join(vllm.__version__.split(".")[:2]) not in GUARDED_VLLM_LINES:
        logger.warning(
            "vllm-lora-ext was checked against vLLM %s, found %s: its start-up guards passed, "
            "but the behaviour of what they check was not tested",
            " and ".join(GUARDED_VLLM_LINES),
            vllm.__version__,
        )
    patches.apply(current_platform, Settings().cpu_punica)
    _registered = True


def every_guard() -> tuple:
    """What every part of this package expects of vLLM (tests check a new release with it)."""
    from vllm_lora_ext.vllm_boundary import patches, worker
    from vllm_lora_ext.vllm_boundary.api import state

    return (*patches.GUARDS, *worker.GUARDS, *state.GUARDS)


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
        from vllm_lora_ext.vllm_boundary.api.state import init_state

        await init_state(engine_client, state, args)
