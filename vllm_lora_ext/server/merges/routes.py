"""``/v1/merges``: start a merge job, follow its progress, cancel it.

``POST /v1/merges`` ``{"name", "adapters": [{"name", "weight"}], "method", "params"}`` answers
202 with the job; ``GET /v1/merges/{id}`` shows its state, phase, IterIS iteration and
residual; ``DELETE /v1/merges/{id}`` cancels a running job. A succeeded job's ``name`` is then
served like any adapter (``"model": name``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.http import ERRORS, parse_body
from vllm_lora_ext.server.merges.jobs import METHODS, MergeJobs, MergeRequest
from vllm_lora_ext.server.state import depends_on

router = APIRouter(tags=["merges"])
Jobs = Annotated[MergeJobs, Depends(depends_on(lambda s: s.merges))]


@router.post("/v1/merges", status_code=202, responses=ERRORS)
async def start_merge(request: Request, jobs: Jobs):
    body = await parse_body(request, MergeRequest, f"; methods: {', '.join(METHODS)}")
    job = await jobs.submit(body)
    return JSONResponse(job.view(), status_code=202)


@router.get("/v1/merges", responses=ERRORS)
async def list_merges(jobs: Jobs):
    return {"merges": jobs.views()}


@router.get("/v1/merges/{job_id}", responses=ERRORS)
async def get_merge(job_id: str, jobs: Jobs):
    view = jobs.view(job_id)
    if view is None:
        raise Refused("not_found", f"merge job {job_id!r} not found", 404)
    return view


@router.delete("/v1/merges/{job_id}", responses=ERRORS)
async def cancel_merge(job_id: str, jobs: Jobs):
    job = jobs.cancel(job_id)
    view = job.view() if job is not None else jobs.view(job_id)  # an earlier run's: as it is
    if view is None:
        raise Refused("not_found", f"merge job {job_id!r} not found", 404)
    return view
