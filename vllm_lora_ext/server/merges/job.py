"""A merge job: what a client asked for (``MergeRequest``), its progress (``MergeJob``) and what
every merge family may use while it runs (``MergeContext``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_lora_ext.jobs.runners import JobRunner
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.jobs import Job
from vllm_lora_ext.server.stats.service import StatsService

State = Literal["running", "succeeded", "failed", "cancelled", "interrupted"]


class MergeTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = Field(1.0, allow_inf_nan=False)


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Model id under which the merged adapter will be served")
    adapters: list[MergeTerm] | Literal["all"] = Field(
        description='the adapters to merge; for adaptive / lorahub the pool ("all": every '
        "adapter of this base)"
    )
    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("adapters")
    @classmethod
    def _not_empty(cls, adapters: list[MergeTerm] | str) -> list[MergeTerm] | str:
        if not adapters:
            raise ValueError("name at least one adapter")
        return adapters

    @field_validator("params")
    @classmethod
    def _finite(cls, params: dict[str, Any]) -> dict[str, Any]:
        """NaN or infinity anywhere in the params is refused now, not when the job runs."""
        if not _all_finite(params):
            raise ValueError("params must not hold NaN or infinite numbers")
        return params


def _all_finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    return True


@dataclass
class MergeJob(Job):
    request: MergeRequest
    state: State = "running"
    phase: str = "queued"
    iteration: int = 0
    iterations: int = 1
    adapter: str | None = None
    prompts_done: int = 0
    residual: float | None = None
    """IterIS: ‖ΔW_t - ΔW_{t-1}‖_F / ‖ΔW_t‖_F over all layers, after each iteration ≥ 2."""
    error: str | None = None
    pool: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    """adaptive / lorahub: selection, weights, controls and the verdict."""
    sources: dict[str, str] = field(default_factory=dict)
    """The weights hash of each adapter the job may read, when it was submitted: the recipe
    names these, and a source deleted or replaced meanwhile fails the job."""

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.request.name,
            "method": self.request.method,
            "state": self.state,
            "phase": self.phase,
            "iteration": self.iteration,
            "iterations": self.iterations,
            "adapter": self.adapter,
            "prompts_done": self.prompts_done,
            "residual": self.residual,
            "error": self.error,
            "result": self.result,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


class Replayer(Protocol):
    """Runs IterIS replays on the served engine (``vllm_boundary/api`` / HTTP to ourselves)."""

    url: str
    headers: dict[str, str]
    model_dir: Path

    async def paired_stats(
        self, own: str, merged_dir: Path, prompts: list[dict], targets: list[str], job: MergeJob
    ) -> Any: ...


@dataclass(frozen=True)
class MergeContext:
    """What a merge family reads while it checks and runs a job: the store's adapters, the
    traffic statistics and the served engine (replays, base weights, self-calls)."""

    adapters: AdapterService
    stats: StatsService
    replayer: Replayer
    runner: JobRunner
    """Runs the heavy steps (IterIS solves, pool merges) out of this process by default."""
