"""The one ASGI middleware in front of vLLM's generation routes.

It reads the body of each ``/v1/completions`` and ``/v1/chat/completions`` request once (small
JSON documents) for its ``model``, then in this order:

1. forwards it to the old server if that adapter is still being migrated (:mod:`.forwarding`);
   such a request never reaches vLLM or the counters here;
2. answers an inline merge (``merge:a=0.7,b=0.3``) that cannot be served itself, in our error
   shape: 400 for a malformed name (``invalid_merge``, ``non_finite``, ``rank_too_high``,
   ``inline_merges_off``), 404 ``unknown_adapter`` naming the unknown source
   (:meth:`InlineMerges.check`), where vLLM would only say "model does not exist";
3. has an adapter deleted or replaced in a shared store by another replica unloaded first;
4. counts it per adapter and offers its prompt to a captured adapter's reservoir;
5. admits it in the :class:`~.forwarding.ForwardTable` until its response ends, so that
   unloading an adapter waits for the requests that still need it.
6. has its adapter read back into memory in the background if vLLM's CPU cache lost it
   (:meth:`AdapterService.load_ahead`): the request waits for the disk, the batch does not.

Step 3 comes before step 5: an unload started by this very request must not wait for it.
vLLM's handler then gets the same body, replayed. ``GET /v1/models`` gets every adapter of the
store (``loaded`` says whether vLLM holds it now) and the forwarded ones added to vLLM's list.

It is also the one door to the engine's adapters: vLLM's own routes that load or unload an
adapter (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` and the SageMaker
``/adapters`` routes, all exposed by ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which the store's
resolver needs) are refused with 403 and a pointer to ``/v1/adapters``: they would load any
server directory into the engine unvalidated, and the SageMaker ones are outside ``/v1``,
which is all that ``--api-key`` guards. vLLM's authentication middleware runs before this
one, so a request without the key never gets here on ``/v1``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.inline_merges import InlineMerges, is_merge
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.http import error
from vllm_lora_ext.server.migrations.forwarding import forward_request, list_forwarded
from vllm_lora_ext.server.state import lora_ext_state

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_MAX_BODY = 64 << 20  # larger bodies go to vLLM unparsed (it refuses them)
_MAX_OBSERVED = 1 << 20  # prompts larger than this are not kept in a reservoir
RAW_LORA_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters"})


def is_raw_lora_route(path: str) -> bool:
    """vLLM's routes that change the engine's adapters without the store (any method)."""
    return path.rstrip("/") in RAW_LORA_PATHS or path.startswith("/adapters/")


class GenerationGateway:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_raw_lora_route(scope["path"]):
            refusal = error(
                403,
                f"{scope['method']} {scope['path']} is disabled by vllm-lora-ext: adapters are "
                "registered, validated and removed through /v1/adapters (POST /v1/adapters "
                "{name, path} or an upload; DELETE /v1/adapters/{name})",
                "use_adapters_api",
            )
            label = "/adapters/{name}" if scope["path"].startswith("/adapters/") else scope["path"]
            metrics.REFUSED_ROUTES.labels(path=label.rstrip("/")).inc()
            await refusal(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/v1/models":
            await _models_with_store(self.app, scope, receive, send)
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
        ext = lora_ext_state(scope["app"].state)
        table = ext.forward if ext is not None else None
        model = None if more else model_of_body(data)
        target = table.target(model) if table is not None else None
        if target is not None:
            await forward_request(table, target, scope, data, model, send)
            return
        service = ext.adapters if ext is not None else None
        if service is not None and is_merge(model):
            refusal = check_inline_merge(service.merges, model)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await _sync_with_store(service, model)
        count_request(model, service)
        if service is not None and is_merge(model):
            service.merges.touch(model)
        stats = ext.stats if ext is not None else None
        if stats is not None and len(data) < _MAX_OBSERVED:
            stats.observe_request(model, data)
        ticket = table.admit(model) if table is not None and isinstance(model, str) else None
        try:
            if service is not None and isinstance(model, str):
                await service.load_ahead(model)
            await self.app(scope, _replay(data, more, receive), send)
        finally:
            if ticket is not None:
                table.release(model, ticket)


def check_inline_merge(merges: InlineMerges, model: str) -> JSONResponse | None:
    """The answer to a request for an inline merge this server cannot serve (a malformed
    name 400, an unknown source 404: :meth:`InlineMerges.check`), before vLLM would answer it
    "model does not exist"; None if it can be served."""
    try:
        merges.check(model)
    except Refused as e:
        if e.reason != "inline_merges_off":
            metrics.VALIDATION_FAILURES.labels(reason=e.reason).inc()
        return error(e.status, e.message, e.reason)
    return None


async def _models_with_store(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """vLLM's model list (a small JSON answer, buffered) with every registered adapter of the
    served base and the forwarded adapters added, so a client choosing from it sees all it can
    request (vLLM lists only what it loaded since start)."""
    ext = lora_ext_state(scope["app"].state)
    if ext is None:
        await app(scope, receive, send)
        return
    service = ext.adapters
    routes = dict(ext.forward.routes)
    registered = service.list()
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
            models = list_registered(json.loads(body), registered, service.base.name)
            body = json.dumps(list_forwarded(models, routes)).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def list_registered(models: dict, registered: list, base: str) -> dict:
    """vLLM's ``/v1/models`` answer with ``loaded`` on each adapter card and a card for each
    registered adapter it lacks (loaded on its first request)."""
    data = [m for m in models.get("data") or [] if isinstance(m, dict)]
    listed = {m.get("id") for m in data}
    for card in data:
        if card.get("parent") is not None:  # vLLM lists the adapters it holds (the base has none)
            card["loaded"] = True
    now = int(time.time())
    for record, is_loaded in registered:
        if record.name not in listed:
            data.append({"id": record.name, "object": "model", "created": now,
                         "owned_by": "vllm", "root": record.name, "parent": base,
                         "loaded": is_loaded})  # fmt: skip
    return {**models, "data": data}


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


def count_request(model: object, service: AdapterService | None) -> None:
    """Count a generation request by the model it names (bounded labels: known names only)."""
    if service is None or not isinstance(model, str):
        return
    if model in service.names:
        metrics.REQUESTS.labels(adapter=model).inc()
    elif model in service.base.aliases:
        metrics.REQUESTS.labels(adapter="base").inc()
    elif is_merge(model):
        metrics.REQUESTS.labels(adapter="merge").inc()


def model_of_body(body: bytes) -> object:
    try:
        return json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
