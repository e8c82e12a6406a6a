"""The one ASGI middleware in front of vLLM's generation routes.

It reads the body of each ``/v1/completions`` and ``/v1/chat/completions`` request once (small
JSON documents) for its ``model``, then in this order:

1. forwards it to the old server if that adapter is still being migrated (:mod:`.forwarding`);
   such a request never reaches vLLM or the counters here;
2. has an adapter deleted or replaced in a shared store by another replica unloaded first;
3. counts it per adapter and offers its prompt to a captured adapter's reservoir;
4. admits it in the :class:`~.forwarding.ForwardTable` until its response ends, so that
   unloading an adapter waits for the requests that still need it.

Step 2 comes before step 4: an unload started by this very request must not wait for it.
vLLM's handler then gets the same body, replayed. ``GET /v1/models`` gets the adapters that
are forwarded added to vLLM's list.
"""

from __future__ import annotations

import contextlib
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_lora_ext.server.adapter_service import AdapterService
from vllm_lora_ext.server.forwarding import ForwardTable, forward_request, list_forwarded
from vllm_lora_ext.server.routes import count_request, model_of_body

logger = logging.getLogger("vllm_lora_ext")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_MAX_BODY = 64 << 20  # larger bodies go to vLLM unparsed (it refuses them)
_MAX_OBSERVED = 1 << 20  # prompts larger than this are not kept in a reservoir


class GenerationGateway:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/v1/models":
            table = getattr(scope["app"].state, "lora_ext_forward", None)
            if table is not None and table.routes:
                await _models_with_forwarded(self.app, scope, receive, send, dict(table.routes))
                return
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > _MAX_BODY:
                break
        data = bytes(body)
        state = scope["app"].state
        table: ForwardTable | None = getattr(state, "lora_ext_forward", None)
        model = None if more else model_of_body(data)
        target = table.target(model) if table is not None else None
        if target is not None:
            await forward_request(table, target, scope, data, model, send)
            return
        service: AdapterService | None = getattr(state, "lora_ext", None)
        await _sync_with_store(service, model)
        count_request(model, service)
        stats = getattr(state, "lora_ext_stats", None)
        if stats is not None and len(data) < _MAX_OBSERVED:
            stats.observe_request(model, data)
        ticket = table.admit(model) if table is not None and isinstance(model, str) else None
        try:
            await self.app(scope, _replay(data, more, receive), send)
        finally:
            if ticket is not None:
                table.release(model, ticket)


async def _models_with_forwarded(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, routes: dict[str, str]
) -> None:
    """vLLM's model list (a small JSON answer, buffered) with the forwarded adapters added."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        else:
            await send(message)

    await app(scope, receive, capture)
    if start is None:
        return
    body = b"".join(chunks)
    if start["status"] == 200:
        # Not the JSON object expected: passed on as it is.
        with contextlib.suppress(ValueError, AttributeError):
            body = json.dumps(list_forwarded(json.loads(body), routes)).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """A receive that hands the app the already-read body first, then the rest of the stream."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


async def _sync_with_store(service: AdapterService | None, model: object) -> None:
    """Before vLLM's handler looks the model up."""
    if service is None or not isinstance(model, str):
        return
    try:
        await service.sync_with_store(model)
    except Exception:  # the request goes on with what vLLM holds
        logger.exception("vllm-lora-ext: cannot check %r against the store", model)
