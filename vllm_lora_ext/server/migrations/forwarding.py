"""Requests for adapters that still live on another server are proxied there, unchanged.

During a base-model upgrade the new server answers for every adapter from the first moment:
adapters not migrated yet (or whose migration was refused or rolled back) are forwarded to the
old server, the rest are served here. Switching an adapter is one dict operation in the event
loop (:meth:`ForwardTable.stop_forwarding`), done only after it is registered and loaded here, so
a request is either forwarded or served locally, never refused in between.

The table also counts every generation request admitted here under its ``model`` until its
response ends (:meth:`ForwardTable.admit`, called by :mod:`.gateway`); unloading an adapter
waits for the requests admitted before it (:meth:`ForwardTable.drain`): removing an adapter
under a request that still needed it made vLLM's engine die reloading it ("No adapter found"),
seen in the hot-upgrade test.

Forwarded responses are streamed back chunk by chunk (SSE streams included) with
``x-lora-ext-routed-to`` set, and ``GET /v1/models`` lists the forwarded adapters too
(:func:`list_forwarded`), so a client that picks its model from that list sees every adapter
throughout the upgrade.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict

import httpx
from starlette.types import Scope, Send

from vllm_lora_ext.server import metrics

ROUTED_HEADER = "x-lora-ext-routed-to"
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"content-length",
     b"host", b"proxy-connection", b"trailer"}
)  # fmt: skip


class ForwardTable:
    """Adapter name -> base URL of the server that serves it for now; requests running here."""

    def __init__(self) -> None:
        self.routes: dict[str, str] = {}
        self.auth: dict[str, dict[str, str]] = {}
        """Target URL -> the headers that authenticate this server there (its API key)."""
        self.in_flight: dict[str, set[int]] = defaultdict(set)
        """Tickets of the generation requests admitted here and not finished, by model name."""
        self._tickets = itertools.count()
        self._client: httpx.AsyncClient | None = None

    def forward(self, name: str, url: str, auth: dict[str, str] | None = None) -> None:
        self.routes[name] = url.rstrip("/")
        self.auth[url.rstrip("/")] = dict(auth or {})
        metrics.FORWARDED_ADAPTERS.set(len(self.routes))

    def stop_forwarding(self, name: str) -> None:
        self.routes.pop(name, None)
        metrics.FORWARDED_ADAPTERS.set(len(self.routes))

    def target(self, model: object) -> str | None:
        return self.routes.get(model) if isinstance(model, str) else None

    def admit(self, model: str) -> int:
        ticket = next(self._tickets)
        self.in_flight[model].add(ticket)
        return ticket

    def release(self, model: str, ticket: int) -> None:
        running = self.in_flight[model]
        running.discard(ticket)
        if not running:
            del self.in_flight[model]

    async def drain(self, name: str, timeout: float = 600.0) -> bool:
        """Wait until the requests for ``name`` admitted so far have finished; False on timeout.

        Requests admitted later do not count: under steady traffic for a name being removed
        (they get 404 or are forwarded) the wait still ends.
        """
        cutoff = next(self._tickets)
        deadline = time.monotonic() + timeout
        while any(t < cutoff for t in self.in_flight.get(name, ())):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
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


def list_forwarded(models: dict, routes: dict[str, str]) -> dict:
    """vLLM's ``/v1/models`` answer plus one model card per forwarded adapter it lacks, marked
    with the server that serves it for now (``forwarded_to``)."""
    data = list(models.get("data") or [])
    listed = {m.get("id") for m in data if isinstance(m, dict)}
    now = int(time.time())
    for name, url in sorted(routes.items()):
        if name not in listed:
            data.append({"id": name, "object": "model", "created": now, "owned_by": "vllm",
                         "root": name, "parent": None, "forwarded_to": url})  # fmt: skip
    return {**models, "data": data}


async def forward_request(
    table: ForwardTable, target: str, scope: Scope, body: bytes, model: object, send: Send
) -> None:
    """Proxy one generation request to ``target`` and stream its response back."""
    # The client proved its key to this server; the old server gets the key this server holds
    # for it (the client's own key may differ, and is not the old server's business).
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in scope["headers"]
        if k.lower() not in _HOP_BY_HOP and k.lower() != b"authorization"
    ]
    headers += list(table.auth.get(target, {}).items())
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
