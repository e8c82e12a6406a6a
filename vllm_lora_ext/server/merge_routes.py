"""``/v1/merges``: start a merge job, follow its progress, cancel it.

``POST /v1/merges`` ``{"name", "adapters": [{"name", "weight"}], "method", "params"}`` answers
202 with the job; ``GET /v1/merges/{id}`` shows its state, phase, IterIS iteration and
residual; ``DELETE /v1/merges/{id}`` cancels a running job. A succeeded job's ``name`` is then
served like any adapter (``"model": name``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from vllm_lora_ext.adapters.validation import AdapterRejected
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.merge_jobs import METHODS, MergeJobs, MergeRequest
from vllm_lora_ext.server.routes import _pydantic_message, app_service, error
from vllm_lora_ext.server.schemas import ErrorResponse

router = APIRouter(tags=["merges"])
_ERRORS: dict[int | str, dict] = {s: {"model": ErrorResponse} for s in (400, 404, 409)}


def _jobs(request: Request) -> MergeJobs | JSONResponse:
    return app_service(request, "lora_ext_merges")


@router.post("/v1/merges", status_code=202, responses=_ERRORS)
async def start_merge(request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    try:
        body = MergeRequest.model_validate_json(await request.body())
    except ValidationError as e:
        return error(400, f"invalid request body: {_pydantic_message(e)}; methods: "
                     f"{', '.join(METHODS)}")  # fmt: skip
    try:
        job = await jobs.submit(body)
    except AdapterRejected as e:
        metrics.VALIDATION_FAILURES.labels(reason=e.reason).inc()
        return error(e.status, e.message, e.reason)
    return JSONResponse(job.view(), status_code=202)


@router.get("/v1/merges", responses=_ERRORS)
async def list_merges(request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    return {"merges": jobs.views()}


@router.get("/v1/merges/{job_id}", responses=_ERRORS)
async def get_merge(job_id: str, request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    view = jobs.view(job_id)
    if view is None:
        return error(404, f"merge job {job_id!r} not found")
    return view


@router.delete("/v1/merges/{job_id}", responses=_ERRORS)
async def cancel_merge(job_id: str, request: Request):
    jobs = _jobs(request)
    if isinstance(jobs, JSONResponse):
        return jobs
    job = jobs.cancel(job_id)
    view = job.view() if job is not None else jobs.view(job_id)  # an earlier run's: as it is
    if view is None:
        return error(404, f"merge job {job_id!r} not found")
    return view
