"""Requests for adapters that still live on another server are proxied there, unchanged.

During a base-model upgrade the new server answers for every adapter from the first moment:
adapters not migrated yet (or whose migration was refused or rolled back) are forwarded to the
old server, the rest are served here. Switching an adapter is one dict operation in the event
loop (:meth:`ForwardTable.stop_forwarding`), done only after it is registered and loaded here, so
a request is either forwarded or served locally, never refused in between.

Rolling an adapter back is the same flip the other way, then a wait until the requests already
admitted here for it have finished (:meth:`ForwardTable.drain`): removing its files under an
admitted request made vLLM's engine die reloading it ("No adapter found"), seen in the
hot-upgrade test before this wait existed.

The middleware buffers a generation request's body only while some adapter is forwarded or
watched (it must read ``model`` before choosing a route); otherwise it is a pass-through.
Forwarded responses are streamed back chunk by chunk (SSE streams included) with
``x-lora-ext-routed-to`` set.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_lora_ext.server import metrics

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
ROUTED_HEADER = "x-lora-ext-routed-to"
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"content-length",
     b"host", b"proxy-connection", b"trailer"}
)  # fmt: skip
_MAX_BODY = 64 << 20


class ForwardTable:
    """Adapter name -> base URL of the server that serves it for now."""

    def __init__(self) -> None:
        self.routes: dict[str, str] = {}
        self.watched: set[str] = set()
        """Adapters served here that may be handed back (switched by a migration)."""
        self.in_flight: Counter[str] = Counter()
        """Requests for watched adapters admitted here and not finished yet."""
        self._client: httpx.AsyncClient | None = None

    @property
    def active(self) -> bool:
        return bool(self.routes or self.watched)

    def forward(self, name: str, url: str) -> None:
        self.routes[name] = url.rstrip("/")
        metrics.FORWARDED_ADAPTERS.set(len(self.routes))

    def stop_forwarding(self, name: str) -> None:
        self.routes.pop(name, None)
        metrics.FORWARDED_ADAPTERS.set(len(self.routes))

    def target(self, model: object) -> str | None:
        return self.routes.get(model) if isinstance(model, str) else None

    async def drain(self, name: str, timeout: float = 600.0) -> bool:
        """Wait until no admitted request for ``name`` is running here; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.in_flight[name] > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily, inside the server's event loop; generations can take minutes.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(600.0, connect=10.0),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return self._client


class ForwardToSource:
    """ASGI middleware: proxy generation requests whose ``model`` is in the forward table."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        table: ForwardTable | None = getattr(scope["app"].state, "lora_ext_forward", None) if (
            scope["type"] == "http"
        ) else None  # fmt: skip
        if (
            table is None
            or not table.active
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
        model = None if more else _model_of(bytes(body))
        target = table.target(model)
        if target is not None:
            await _proxy(table, target, scope, bytes(body), send)
            return
        watched = isinstance(model, str) and model in table.watched
        if watched:
            table.in_flight[model] += 1
        try:
            await self.app(scope, _replay(bytes(body), more, receive), send)
        finally:
            if watched:
                table.in_flight[model] -= 1


def _model_of(body: bytes) -> object:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed.get("model") if isinstance(parsed, dict) else None


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


async def _proxy(table: ForwardTable, target: str, scope: Scope, body: bytes, send: Send) -> None:
    model = _model_of(body)
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in scope["headers"]
        if k.lower() not in _HOP_BY_HOP
    ]
    request = table.client.build_request(
        "POST", f"{target}{scope['path']}", content=body, headers=headers
    )
    try:
        response = await table.client.send(request, stream=True)
    except httpx.HTTPError as e:
        metrics.FORWARD_FAILURES.inc()
        message = f"adapter {model!r} is served by {target} during a migration, unreachable: {e}"
        payload = json.dumps(
            {"error": {"message": message, "type": "BadGateway", "code": 502}}
        ).encode()
        await send({"type": "http.response.start", "status": 502,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})
        return
    metrics.FORWARDED_REQUESTS.labels(adapter=str(model)).inc()
    try:
        out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP] + [
            (ROUTED_HEADER.encode(), target.encode())
        ]
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": out_headers})  # fmt: skip
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.aclose()
