"""ASGI middleware counting generation requests per adapter, read off the body vLLM consumes.

It also offers each request's prompt to the statistics reservoir of a captured adapter, and
has an adapter deleted or replaced in a shared store by another replica unloaded first.

It watches the body as vLLM's handler reads it (no buffering, no replay), so it adds no copy
and cannot change what the handler sees.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_lora_ext.server.adapter_service import AdapterService
from vllm_lora_ext.server.routes import count_request, model_of_body

logger = logging.getLogger("vllm_lora_ext")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_MAX_PEEK = 1 << 20  # a "model" field is near the start; do not hold huge prompts


class RequestsPerAdapter:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        seen = bytearray()
        counted = False

        async def watching_receive() -> Message:
            nonlocal counted
            message = await receive()
            if message["type"] == "http.request" and not counted:
                if len(seen) < _MAX_PEEK:
                    seen.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    counted = True
                    state = scope["app"].state
                    model = model_of_body(bytes(seen))
                    count_request(model, getattr(state, "lora_ext", None))
                    stats = getattr(state, "lora_ext_stats", None)
                    if stats is not None and len(seen) < _MAX_PEEK:
                        stats.observe_request(model, bytes(seen))
                    await _sync_with_store(getattr(state, "lora_ext", None), model)
            return message

        await self.app(scope, watching_receive, send)


async def _sync_with_store(service: AdapterService | None, model: object) -> None:
    """Before vLLM's handler (which has not seen the body yet) looks the model up."""
    if service is None or not isinstance(model, str):
        return
    try:
        await service.sync_with_store(model)
    except Exception:  # the request goes on with what vLLM holds
        logger.exception("vllm-lora-ext: cannot check %r against the store", model)
