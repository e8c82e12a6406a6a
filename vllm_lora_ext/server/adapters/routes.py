"""``/v1/adapters``: list, register (from a server path or an upload) and delete adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from vllm_lora_ext.adapters.store import StoredAdapter
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.http import parse_body
from vllm_lora_ext.server.schemas import AdapterInfo, AdapterList, ErrorResponse, RegisterFromPath
from vllm_lora_ext.server.state import depends_on

router = APIRouter(tags=["adapters"])
_ERRORS: dict[int | str, dict] = {s: {"model": ErrorResponse} for s in (400, 403, 404, 409, 413)}
_MAX_FILES = 8
Service = Annotated[AdapterService, Depends(depends_on(lambda s: s.adapters))]


def _info(
    record: StoredAdapter, loaded: bool, pinned: bool = False, cached: bool | None = None
) -> AdapterInfo:
    fields = record.model_dump(include=set(AdapterInfo.model_fields))
    return AdapterInfo(loaded=loaded, pinned=pinned, cached=cached, **fields)


@router.get("/v1/adapters", response_model=AdapterList, responses=_ERRORS)
async def list_adapters(service: Service):
    cached = await service.engine.cached_names()
    return AdapterList(
        base=service.base.name,
        max_lora_rank=service.max_rank,
        adapters=[
            _info(a, loaded, a.name in service.pinned, a.name in cached)
            for a, loaded in service.list()
        ],
    )


@router.get("/v1/adapters/{name}", response_model=AdapterInfo, responses=_ERRORS)
async def get_adapter(name: str, service: Service):
    record = service.get(name)
    if record is None:
        raise Refused("not_found", f"adapter {name!r} not found", 404)
    return _info(record, name in service.engine.loaded_names(), name in service.pinned)


@router.post("/v1/adapters/{name}/prefetch", response_model=AdapterInfo, responses=_ERRORS)
async def prefetch_adapter(name: str, service: Service):
    """Load a stored adapter into vLLM's CPU cache now, without a generation request."""
    await service.prefetch(name)
    return await _cached_info(name, service)


@router.post("/v1/adapters/{name}/pin", response_model=AdapterInfo, responses=_ERRORS)
async def pin_adapter(name: str, service: Service):
    """Load and keep an adapter in vLLM's CPU cache until it is deleted or the server stops."""
    await service.pin(name)
    return await _cached_info(name, service)


async def _cached_info(name: str, service: AdapterService) -> AdapterInfo:
    record = service.get(name)
    assert record is not None
    return _info(record, True, name in service.pinned, name in await service.engine.cached_names())


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo, responses=_ERRORS)
async def register_adapter(request: Request, service: Service):
    """Register an adapter from a JSON body ``{"name", "path"}`` (a directory on the server) or
    a multipart upload: field ``name`` plus files ``adapter_config.json`` and
    ``adapter_model.safetensors``. It is validated, stored and loaded into vLLM."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        record = await _register_upload(service, request)
    elif content_type.startswith("application/json"):
        body = await parse_body(request, RegisterFromPath)
        record = await _validated(service.register_client_path(body.name, Path(body.path)))
    else:
        raise Refused(
            "malformed_upload",
            "send application/json {name, path} or multipart/form-data (name + files)",
            415 if content_type else 400,
        )
    return JSONResponse(_info(record, True).model_dump(), status_code=201)


async def _validated(registration: Awaitable[StoredAdapter]) -> StoredAdapter:
    """A registration's refusals also count as validation failures (the adapter's reason)."""
    try:
        return await registration
    except Refused as e:
        metrics.VALIDATION_FAILURES.labels(reason=e.reason).inc()
        raise


@router.delete("/v1/adapters/{name}", responses=_ERRORS)
async def delete_adapter(name: str, service: Service):
    if not await service.remove(name):
        raise Refused("not_found", f"adapter {name!r} not found", 404)
    return {"deleted": name}


async def _register_upload(service: AdapterService, request: Request) -> StoredAdapter:
    try:
        form = await request.form(max_files=_MAX_FILES, max_fields=4)
    except (MultiPartException, HTTPException) as e:  # Starlette's own shape otherwise
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
        raise Refused(
            "too_many_files" if "too many" in str(detail).lower() else "malformed_upload",
            f"cannot read the upload: {detail} (at most {_MAX_FILES} files)",
        ) from e
    try:
        name = form.get("name")
        if not isinstance(name, str):
            raise Refused("invalid_name", "the form needs a text field 'name'")
        uploads = [v for k, v in form.multi_items() if k != "name"]
        if not all(isinstance(u, UploadFile) for u in uploads):
            raise Refused("unexpected_file", "every field but 'name' must be a file")

        async def files() -> AsyncIterator[tuple[str, Iterable[bytes]]]:
            for upload in uploads:
                assert isinstance(upload, UploadFile)
                yield upload.filename or "", _read_all(upload)

        return await _validated(service.register(name, files(), source="upload"))
    finally:
        await form.close()


def _read_all(upload: UploadFile, size: int = 1 << 20) -> Iterable[bytes]:
    # UploadFile spools to a real file; read it synchronously in chunks.
    upload.file.seek(0)
    yield from iter(lambda: upload.file.read(size), b"")
