"""``/v1/stats``: capture layer-input statistics from live traffic, per adapter.

``POST /v1/stats/{adapter}/start`` and ``/stop``; ``GET /v1/stats`` (all) and
``GET /v1/stats/{adapter}``; ``GET .../export`` (safetensors bytes, additive) and
``POST .../import`` (sum another replica's export into ours); ``DELETE`` drops held statistics.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.http import ERRORS, pydantic_message
from vllm_lora_ext.server.state import depends_on
from vllm_lora_ext.server.stats.service import CaptureSettings, StatsService

router = APIRouter(tags=["stats"])
Stats = Annotated[StatsService, Depends(depends_on(lambda s: s.stats))]


class StartCapture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_budget: int = Field(200_000, ge=1, description="Tokens summed per layer, at most")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="Fraction of tokens kept")
    seed: int = Field(0, description="Seeds the token sampling and the prompt reservoir")


@router.get("/v1/stats", responses=ERRORS)
async def list_stats(stats: Stats):
    return {
        "memory_budget_bytes": stats.memory_budget_bytes,
        "adapters": await stats.describe_all(),
    }


@router.get("/v1/stats/{adapter}", responses=ERRORS)
async def get_stats(adapter: str, stats: Stats):
    stats._adapter(adapter)
    return await stats.describe(adapter)


@router.get("/v1/stats/{adapter}/prompts", responses=ERRORS)
async def reservoir_prompts(adapter: str, stats: Stats):
    """The sampled prompts served with the adapter while captured (seeds for a migration)."""
    stats._adapter(adapter)
    reservoir = stats.reservoirs.get(adapter)
    return {
        "adapter": adapter,
        "seen": reservoir.seen if reservoir else 0,
        "prompts": list(reservoir.items) if reservoir else [],
    }


@router.post("/v1/stats/{adapter}/start", responses=ERRORS)
async def start_capture(adapter: str, request: Request, stats: Stats):
    try:  # an empty body takes the defaults
        body = StartCapture.model_validate_json(await request.body() or b"{}")
    except ValidationError as e:
        raise Refused("invalid_body", f"invalid request body: {pydantic_message(e)}") from e
    return await stats.start(
        adapter, CaptureSettings(body.token_budget, body.sample_rate, body.seed)
    )


@router.post("/v1/stats/{adapter}/stop", responses=ERRORS)
async def stop_capture(adapter: str, stats: Stats):
    return await stats.stop(adapter)


@router.get("/v1/stats/{adapter}/export", responses=ERRORS)
async def export_stats(adapter: str, stats: Stats):
    snapshot = await stats.snapshot(adapter)
    if snapshot is None:
        raise Refused("not_found", f"no statistics for {adapter!r}; start a capture first", 404)
    return Response(snapshot.to_bytes(), media_type="application/octet-stream")


@router.post("/v1/stats/{adapter}/import", responses=ERRORS)
async def import_stats(adapter: str, request: Request, stats: Stats):
    return await stats.import_bytes(adapter, await request.body())


@router.delete("/v1/stats/{adapter}", responses=ERRORS)
async def delete_stats(adapter: str, stats: Stats):
    if not await stats.clear(adapter):
        raise Refused("not_found", f"no statistics held for {adapter!r}", 404)
    return {"deleted": adapter}
