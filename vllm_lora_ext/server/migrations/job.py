"""A migration job's request and state: what ``POST /v1/migrations`` takes, and per adapter
what became of it (its running job, the gate's verdict).
The service that runs jobs is :mod:`.jobs`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from vllm_lora_ext.jobs.runners import RunningJob
from vllm_lora_ext.migrate.source import SourceInfo
from vllm_lora_ext.migrate.spec import MigrationOptions, MigrationSpec, Seed
from vllm_lora_ext.server.jobs import Job

AdapterState = Literal[
    "pending", "running", "switched", "kept_old", "failed", "cancelled", "rolled_back",
    "interrupted",
]  # fmt: skip
JobState = Literal["running", "done", "cancelled", "rolling_back", "rolled_back", "interrupted"]


class AdapterTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_description: str | None = Field(
        None, min_length=1, description="What the adapter does, e.g. 'two-digit arithmetic'"
    )
    seeds: list[Seed] = Field(default_factory=list, description="Example inputs (+ answers)")
    choice_prefix: str | None = Field(
        None,
        min_length=1,
        description="Multiple choice: the marker before each option in an input (e.g. "
        "'\\n  choice: '), or BBH's '\\nOptions:\\n' block of '(A) text' / '- text' lines; "
        "the teacher then labels by its most likely option",
    )


class MigrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_url: str = Field(pattern=r"^https?://", description="The old server")
    source_model: str | None = Field(None, description="Base the old server must be serving")
    source_model_path: str | None = Field(
        None, description="Local folder of the old base (tokenizer, discriminator training)"
    )
    adapters: list[str] | None = Field(None, min_length=1, description="Default: all of them")
    generator: Literal["old_base", "new_base"] = Field(
        "old_base",
        description="Who writes synthetic inputs: the old server's base (already loaded and "
        "batched) or this server's base (the paper's choice: the target model)",
    )
    tasks: dict[str, AdapterTask] = Field(default_factory=dict)
    options: MigrationOptions = Field(default_factory=MigrationOptions)
    source_api_key: SecretStr | None = Field(
        None,
        description="The old server's --api-key (default: this server's own); never shown "
        "or stored",
    )


@dataclass
class AdapterMigration:
    name: str
    spec: MigrationSpec
    work_dir: Path
    state: AdapterState = "pending"
    error: str | None = None
    gate: dict[str, Any] | None = None
    seconds: float | None = None
    job: RunningJob | None = None
    """The Migrator's job while this run started one (its progress file outlives it)."""

    def progress(self) -> dict[str, Any] | None:
        return self.job.progress() if self.job is not None else None

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "examples": {"seeds": len(self.spec.seeds), "reservoir": len(self.spec.reservoir)},
            "progress": self.progress(),
            "runs_in": self.job.where if self.job is not None and self.state == "running" else None,
            "gate": self.gate,
            "error": self.error,
            "seconds": self.seconds,
        }


@dataclass
class MigrationJob(Job):
    request: MigrationRequest
    source: SourceInfo
    old_base: Path
    adapters: list[AdapterMigration]
    state: JobState = "running"
    rollback_task: asyncio.Task | None = None
    cancelled: bool = False

    def record(self) -> dict[str, Any]:
        """The view and the request (to post again after a restart), never its source key."""
        request = self.request.model_dump(mode="json", exclude={"source_api_key"})
        return self.view() | {"request": request}

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "source_url": self.source.url,
            "source_base": self.source.base,
            "adapters": [a.view() for a in self.adapters],
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }
