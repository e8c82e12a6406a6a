"""``/v1/stats``: capture layer-input statistics from live traffic, per adapter.

``POST /v1/stats/{adapter}/start`` and ``/stop``; ``GET /v1/stats`` (all) and
``GET /v1/stats/{adapter}``; ``GET .../export`` (safetensors bytes, additive) and
``POST .../import`` (sum another replica's export into ours); ``DELETE`` drops held statistics.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_lora_ext.adapters.validation import AdapterRejected
from vllm_lora_ext.server.routes import _pydantic_message, app_service, error
from vllm_lora_ext.server.schemas import ErrorResponse
from vllm_lora_ext.server.stats_service import CaptureSettings, StatsService

router = APIRouter(tags=["stats"])
_ERRORS: dict[int | str, dict] = {s: {"model": ErrorResponse} for s in (400, 404, 409, 422)}


class StartCapture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_budget: int = Field(200_000, ge=1, description="Tokens summed per layer, at most")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="Fraction of tokens kept")
    seed: int = Field(0, description="Seeds the token sampling and the prompt reservoir")


def _stats(request: Request) -> StatsService | JSONResponse:
    return app_service(request, "lora_ext_stats")


async def _run(request: Request, action):
    stats = _stats(request)
    if isinstance(stats, JSONResponse):
        return stats
    try:
        return await action(stats)
    except AdapterRejected as e:
        return error(e.status, e.message, e.reason)


@router.get("/v1/stats", responses=_ERRORS)
async def list_stats(request: Request):
    async def action(stats: StatsService):
        return {
            "memory_budget_bytes": stats.memory_budget_bytes,
            "adapters": await stats.describe_all(),
        }

    return await _run(request, action)


@router.get("/v1/stats/{adapter}", responses=_ERRORS)
async def get_stats(adapter: str, request: Request):
    async def action(stats: StatsService):
        stats._adapter(adapter)
        return await stats.describe(adapter)

    return await _run(request, action)


@router.get("/v1/stats/{adapter}/prompts", responses=_ERRORS)
async def reservoir_prompts(adapter: str, request: Request):
    """The sampled prompts served with the adapter while captured (seeds for a migration)."""

    async def action(stats: StatsService):
        stats._adapter(adapter)
        reservoir = stats.reservoirs.get(adapter)
        return {
            "adapter": adapter,
            "seen": reservoir.seen if reservoir else 0,
            "prompts": list(reservoir.items) if reservoir else [],
        }

    return await _run(request, action)


@router.post("/v1/stats/{adapter}/start", responses=_ERRORS)
async def start_capture(adapter: str, request: Request):
    raw = await request.body()
    try:
        body = StartCapture.model_validate_json(raw or b"{}")
    except ValidationError as e:
        return error(400, f"invalid request body: {_pydantic_message(e)}")
    settings = CaptureSettings(body.token_budget, body.sample_rate, body.seed)
    return await _run(request, lambda stats: stats.start(adapter, settings))


@router.post("/v1/stats/{adapter}/stop", responses=_ERRORS)
async def stop_capture(adapter: str, request: Request):
    return await _run(request, lambda stats: stats.stop(adapter))


@router.get("/v1/stats/{adapter}/export", responses=_ERRORS)
async def export_stats(adapter: str, request: Request):
    async def action(stats: StatsService):
        snapshot = await stats.snapshot(adapter)
        if snapshot is None:
            return error(404, f"no statistics for {adapter!r}; start a capture first")
        return Response(snapshot.to_bytes(), media_type="application/octet-stream")

    return await _run(request, action)


@router.post("/v1/stats/{adapter}/import", responses=_ERRORS)
async def import_stats(adapter: str, request: Request):
    data = await request.body()
    return await _run(request, lambda stats: stats.import_bytes(adapter, data))


@router.delete("/v1/stats/{adapter}", responses=_ERRORS)
async def delete_stats(adapter: str, request: Request):
    async def action(stats: StatsService):
        if not await stats.clear(adapter):
            return error(404, f"no statistics held for {adapter!r}")
        return {"deleted": adapter}

    return await _run(request, action)
