"""ASGI middleware counting generation requests per adapter, read off the body vLLM consumes.

It watches the body as vLLM's handler reads it (no buffering, no replay), so it adds no copy
and cannot change what the handler sees.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_lora_ext.server.routes import count_request, model_of_body

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
                    service = getattr(scope["app"].state, "lora_ext", None)
                    count_request(model_of_body(bytes(seen)), service)
            return message

        await self.app(scope, watching_receive, send)
