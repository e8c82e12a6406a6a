"""What every route shares: the error shape, the one handler that turns :class:`Refused` into
it, request bodies parsed into pydantic models (services reach routes through ``state.py``).

A route raises :class:`Refused` (or lets a service raise it) and never builds an error itself;
the handler answers in vLLM's error shape with the ``reason`` added and counts the refusal in
``vllm_lora_ext_refusals_total{api, reason}``.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.schemas import ErrorDetail, ErrorResponse

_Model = TypeVar("_Model", bound=BaseModel)
_KINDS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFoundError",
    409: "ConflictError",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "UnprocessableEntity",
    502: "BadGateway",
}
ERRORS: dict[int | str, dict] = {s: {"model": ErrorResponse} for s in (400, 404, 409)}
"""OpenAPI ``responses`` of a route that may refuse."""


def error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    kind = _KINDS.get(status, "BadRequestError")
    detail = ErrorDetail(message=message, type=kind, reason=reason, code=status)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


def api_of(path: str) -> str:
    """The API a path belongs to, a bounded label: adapters, stats, merges, migrations, other."""
    parts = path.strip("/").split("/")
    known = ("adapters", "stats", "merges", "migrations")
    return parts[1] if len(parts) >= 2 and parts[0] == "v1" and parts[1] in known else "other"


async def refused_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    metrics.REFUSALS.labels(api=api_of(request.url.path), reason=exc.reason).inc()
    return error(exc.status, exc.message, exc.reason)


def pydantic_message(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
    )


async def parse_body(request: Request, model: type[_Model], hint: str = "") -> _Model:
    """The JSON body as ``model``, or ``Refused(invalid_body)`` saying which field is wrong."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise Refused("invalid_body", f"invalid request body: {pydantic_message(e)}{hint}") from e
