"""The one typed state on ``app.state``: routes get their service from it, and answer 409
``lora_disabled`` when the server runs without LoRA or without that service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.http import refused_handler
from vllm_lora_ext.server.state import LoraExtState, depends_on, install, lora_ext_state

Adapters = Annotated[object, Depends(depends_on(lambda s: s.adapters))]
Merges = Annotated[object, Depends(depends_on(lambda s: s.merges))]


def _app() -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(Refused, refused_handler)

    @app.get("/adapters")
    def get_adapters(service: Adapters) -> dict:
        return {"service": str(service)}

    @app.get("/merges")
    def get_merges(jobs: Merges) -> dict:
        return {"jobs": str(jobs)}

    return app


def test_routes_take_their_service_from_the_typed_state() -> None:
    app = _app()
    client = TestClient(app)
    for path in ("/adapters", "/merges"):  # before start, and without LoRA
        r = client.get(path)
        assert r.status_code == 409 and r.json()["error"]["reason"] == "lora_disabled"
    install(app.state, None)
    assert lora_ext_state(app.state) is None and client.get("/adapters").status_code == 409
    state = LoraExtState(adapters="the adapter service")  # type: ignore[arg-type]
    install(app.state, state)
    assert lora_ext_state(app.state) is state and app.state.lora_ext is state
    assert client.get("/adapters").json() == {"service": "the adapter service"}
    assert client.get("/merges").status_code == 409  # a service this server does not run
    state.merges = "the merge jobs"  # type: ignore[assignment]
    assert client.get("/merges").json() == {"jobs": "the merge jobs"}
