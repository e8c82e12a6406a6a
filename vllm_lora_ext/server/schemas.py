"""Pydantic types of the HTTP API. They stop at the route handlers; the store never sees them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RegisterFromPath(BaseModel):
    """``POST /v1/adapters`` with a JSON body: register a PEFT directory on the server's disk."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Model id under which the adapter will be requested")
    path: str = Field(description="Directory holding adapter_config.json and the safetensors")


class AdapterInfo(BaseModel):
    name: str
    base: str
    rank: int
    lora_alpha: float
    target_modules: list[str]
    size_bytes: int
    loaded: bool = Field(description="Whether vLLM has it loaded now (else loaded on first use)")
    pinned: bool = Field(False, description="Never evicted from vLLM's CPU cache")
    cached: bool | None = Field(
        None, description="In vLLM's CPU cache now (--max-cpu-loras, LRU); given by the list"
    )
    created_at: float
    source: str


class AdapterList(BaseModel):
    base: str
    max_lora_rank: int
    adapters: list[AdapterInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    reason: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Same shape as vLLM's OpenAI-style errors, plus a machine-readable ``reason``."""

    error: ErrorDetail
