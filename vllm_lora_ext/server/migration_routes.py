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

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from vllm_lora_ext.server.migration_jobs import MigrationJobs, MigrationRefused, MigrationRequest
from vllm_lora_ext.server.routes import _pydantic_message, app_service, error
from vllm_lora_ext.server.schemas import ErrorResponse

router = APIRouter(tags=["migrations"])
_ERRORS: dict[int | str, dict] = {s: {"model": ErrorResponse} for s in (400, 404, 409, 502)}


def _jobs(request: Request) -> MigrationJobs | JSONResponse:
    return app_service(request, "lora_ext_migrations")


@router.post("/v1/migrations", status_code=202, responses=_ERRORS)
async def start_migration(request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    try:
        body = MigrationRequest.model_validate_json(await request.body())
    except ValidationError as e:
        return error(400, f"invalid request body: {_pydantic_message(e)}")
    try:
        job = await jobs.submit(body)
    except MigrationRefused as e:
        return error(e.status, e.message)
    return JSONResponse(job.view(), status_code=202)


@router.get("/v1/migrations", responses=_ERRORS)
async def list_migrations(request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    return {
        "migrations": jobs.views(),
        "forwarded": dict(jobs.forward.routes),
    }


@router.get("/v1/migrations/{job_id}", responses=_ERRORS)
async def get_migration(job_id: str, request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    view = jobs.view(job_id)
    if view is None:
        return error(404, f"migration {job_id!r} not found")
    return view


@router.delete("/v1/migrations/{job_id}", responses=_ERRORS)
async def roll_back_migration(job_id: str, request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    job = jobs.rollback(job_id)
    if job is None:
        if (view := jobs.view(job_id)) is not None:  # an earlier run's: nothing runs it now
            return error(
                409, f"migration {job_id!r} ran before this server restarted "
                f"(state {view['state']!r}); post its request again to resume it"
            )  # fmt: skip
        return error(404, f"migration {job_id!r} not found")
    return JSONResponse(job.view(), status_code=202 if job.state == "rolling_back" else 200)
