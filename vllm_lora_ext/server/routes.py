"""``/v1/adapters``: list, register (from a server path or an upload) and delete adapters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from vllm_lora_ext.adapters.store import StoredAdapter
from vllm_lora_ext.adapters.validation import AdapterRejected
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapter_service import AdapterService
from vllm_lora_ext.server.schemas import (
    AdapterInfo,
    AdapterList,
    ErrorDetail,
    ErrorResponse,
    RegisterFromPath,
)

router = APIRouter(tags=["adapters"])
_ERRORS: dict[int | str, dict] = {s: {"model": ErrorResponse} for s in (400, 404, 409, 413)}
_MAX_FILES = 8


def error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    kind = {
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFoundError",
        409: "ConflictError",
        413: "PayloadTooLarge",
        502: "BadGateway",
    }
    body = ErrorResponse(
        error=ErrorDetail(
            message=message, type=kind.get(status, "BadRequestError"), reason=reason, code=status
        )
    )
    return JSONResponse(body.model_dump(), status_code=status)


def app_service(request: Request, attribute: str) -> Any:
    """The plugin's service stored on ``app.state`` under ``attribute``, or the 409 answer
    (the plugin sets none of them when the server runs without LoRA)."""
    service = getattr(request.app.state, attribute, None)
    if service is None:
        return error(409, "LoRA is not enabled on this server (start it with --enable-lora)")
    return service


def _service(request: Request) -> AdapterService | JSONResponse:
    return app_service(request, "lora_ext")


def _info(
    record: StoredAdapter, loaded: bool, pinned: bool = False, cached: bool | None = None
) -> AdapterInfo:
    fields = record.model_dump(include=set(AdapterInfo.model_fields))
    return AdapterInfo(loaded=loaded, pinned=pinned, cached=cached, **fields)


@router.get("/v1/adapters", response_model=AdapterList, responses=_ERRORS)
async def list_adapters(request: Request):
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
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
async def get_adapter(name: str, request: Request):
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
    try:
        record = service.get(name)
    except AdapterRejected as e:
        return error(e.status, e.message, e.reason)
    if record is None:
        return error(404, f"adapter {name!r} not found")
    return _info(record, name in service.engine.loaded_names(), name in service.pinned)


@router.post("/v1/adapters/{name}/prefetch", response_model=AdapterInfo, responses=_ERRORS)
async def prefetch_adapter(name: str, request: Request):
    """Load a stored adapter into vLLM's CPU cache now, without a generation request."""
    return await _cache_action(name, request, lambda s: s.prefetch(name))


@router.post("/v1/adapters/{name}/pin", response_model=AdapterInfo, responses=_ERRORS)
async def pin_adapter(name: str, request: Request):
    """Load and keep an adapter in vLLM's CPU cache until it is deleted or the server stops."""
    return await _cache_action(name, request, lambda s: s.pin(name))


async def _cache_action(name: str, request: Request, action) -> AdapterInfo | JSONResponse:
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
    try:
        await action(service)
        record = service.get(name)
    except AdapterRejected as e:
        return error(e.status, e.message, e.reason)
    assert record is not None
    return _info(record, True, name in service.pinned, name in await service.engine.cached_names())


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo, responses=_ERRORS)
async def register_adapter(request: Request):
    """Register an adapter from a JSON body ``{"name", "path"}`` (a directory on the server) or
    a multipart upload: field ``name`` plus files ``adapter_config.json`` and
    ``adapter_model.safetensors``. It is validated, stored and loaded into vLLM."""
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            record = await _register_upload(service, request)
        elif content_type.startswith("application/json"):
            try:
                body = RegisterFromPath.model_validate_json(await request.body())
            except ValidationError as e:
                return error(400, f"invalid request body: {_pydantic_message(e)}")
            record = await service.register_client_path(body.name, Path(body.path))
        else:
            return error(
                415 if content_type else 400,
                "send application/json {name, path} or multipart/form-data (name + files)",
                "malformed_upload",
            )
    except AdapterRejected as e:
        metrics.VALIDATION_FAILURES.labels(reason=e.reason).inc()
        return error(e.status, e.message, e.reason)
    return JSONResponse(_info(record, True).model_dump(), status_code=201)


@router.delete("/v1/adapters/{name}", responses=_ERRORS)
async def delete_adapter(name: str, request: Request):
    service = _service(request)
    if isinstance(service, JSONResponse):
        return service
    try:
        removed = await service.remove(name)
    except AdapterRejected as e:
        return error(e.status, e.message, e.reason)
    if not removed:
        return error(404, f"adapter {name!r} not found")
    return {"deleted": name}


async def _register_upload(service: AdapterService, request: Request) -> StoredAdapter:
    try:
        form = await request.form(max_files=_MAX_FILES, max_fields=4)
    except (MultiPartException, HTTPException) as e:  # Starlette's own shape otherwise
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
        raise AdapterRejected(
            "too_many_files" if "too many" in str(detail).lower() else "malformed_upload",
            f"cannot read the upload: {detail} (at most {_MAX_FILES} files)",
        ) from e
    try:
        name = form.get("name")
        if not isinstance(name, str):
            raise AdapterRejected("invalid_name", "the form needs a text field 'name'")
        uploads = [v for k, v in form.multi_items() if k != "name"]
        if not all(isinstance(u, UploadFile) for u in uploads):
            raise AdapterRejected("unexpected_file", "every field but 'name' must be a file")

        async def files() -> AsyncIterator[tuple[str, Iterable[bytes]]]:
            for upload in uploads:
                assert isinstance(upload, UploadFile)
                yield upload.filename or "", _read_all(upload)

        return await service.register(name, files(), source="upload")
    finally:
        await form.close()


def _read_all(upload: UploadFile, size: int = 1 << 20) -> Iterable[bytes]:
    # UploadFile spools to a real file; read it synchronously in chunks.
    upload.file.seek(0)
    yield from iter(lambda: upload.file.read(size), b"")


def _pydantic_message(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
    )


def count_request(model: object, service: AdapterService | None) -> None:
    """Count a generation request by the model it names (bounded labels: known names only)."""
    if service is None or not isinstance(model, str):
        return
    if model in service.names:
        metrics.REQUESTS.labels(adapter=model).inc()
    elif model in service.base.aliases:
        metrics.REQUESTS.labels(adapter="base").inc()
    elif model.startswith("merge:"):
        metrics.REQUESTS.labels(adapter="merge").inc()


def model_of_body(body: bytes) -> object:
    try:
        return json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
