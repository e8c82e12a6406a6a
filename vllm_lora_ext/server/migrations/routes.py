"""``/v1/migrations``: carry the adapters of an old server over to this server's base.

``POST /v1/migrations`` ``{"source_url", "source_model"?, "source_model_path"?, "adapters"?,
"tasks"?: {name: {"task_description", "seeds": [{"input", "output"}]}}, "options"?}`` answers
202 with the job; from then on requests for those adapters are answered here (forwarded to the
old server until each one is switched). ``GET /v1/migrations/{id}`` shows per adapter its state,
step, counts (generated / kept / rejected / labelled), training step and loss, and the gate's
verdict. ``DELETE /v1/migrations/{id}`` cancels and rolls back to the old routing (202 while
it rolls back: ``state`` is ``rolling_back``, then ``rolled_back``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.http import ERRORS, parse_body
from vllm_lora_ext.server.migrations.job import MigrationRequest
from vllm_lora_ext.server.migrations.jobs import MigrationJobs
from vllm_lora_ext.server.schemas import ErrorResponse
from vllm_lora_ext.server.state import depends_on

router = APIRouter(tags=["migrations"])
Jobs = Annotated[MigrationJobs, Depends(depends_on(lambda s: s.migrations))]
_ERRORS = {**ERRORS, 502: {"model": ErrorResponse}}


@router.post("/v1/migrations", status_code=202, responses=_ERRORS)
async def start_migration(request: Request, jobs: Jobs):
    job = await jobs.submit(await parse_body(request, MigrationRequest))
    return JSONResponse(job.view(), status_code=202)


@router.get("/v1/migrations", responses=_ERRORS)
async def list_migrations(jobs: Jobs):
    return {"migrations": jobs.views(), "forwarded": dict(jobs.forward.routes)}


@router.get("/v1/migrations/{job_id}", responses=_ERRORS)
async def get_migration(job_id: str, jobs: Jobs):
    view = jobs.view(job_id)
    if view is None:
        raise Refused("not_found", f"migration {job_id!r} not found", 404)
    return view


@router.delete("/v1/migrations/{job_id}", responses=_ERRORS)
async def roll_back_migration(job_id: str, jobs: Jobs):
    job = jobs.rollback(job_id)
    if job is None:
        if (view := jobs.view(job_id)) is not None:  # an earlier run's: nothing runs it now
            raise Refused(
                "job_conflict",
                f"migration {job_id!r} ran before this server restarted (state "
                f"{view['state']!r}); post its request again to resume it",
                409,
            )
        raise Refused("not_found", f"migration {job_id!r} not found", 404)
    return JSONResponse(job.view(), status_code=202 if job.state == "rolling_back" else 200)
