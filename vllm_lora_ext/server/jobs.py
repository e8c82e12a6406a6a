"""What merge and migration jobs share: identity and timing, one background task each, and a
book of this run's jobs beside the records of earlier runs (``job_records.py``).

A kind of job subclasses :class:`Job` (its own fields, states and ``view``) and keeps its jobs
in a :class:`JobBook`; the book starts each job's task, lists and finds jobs for the routes, and
writes each job's record whenever the job says it reached a milestone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from vllm_lora_ext.server.job_records import JobRecords


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Job:
    id: str
    created_at: float = field(default_factory=time.time, kw_only=True)
    finished_at: float | None = field(default=None, kw_only=True)
    task: asyncio.Task | None = field(default=None, kw_only=True, repr=False)

    def view(self) -> dict[str, Any]:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What is written to disk: the view, unless a kind keeps more (never secrets)."""
        return self.view()

    def finish(self) -> None:
        self.finished_at = time.time()


J = TypeVar("J", bound=Job)


class JobBook(Generic[J]):
    """This run's jobs by id, and the records of earlier runs (``interrupted`` if they were
    running when the server stopped)."""

    def __init__(self, records_dir: Path, live_states: frozenset[str]) -> None:
        self.jobs: dict[str, J] = {}
        self.records = JobRecords(records_dir, live_states)

    def start(self, job: J, work: Coroutine[Any, Any, None]) -> J:
        """Record the job and run ``work`` as its background task."""
        self.jobs[job.id] = job
        self.save(job)
        job.task = asyncio.create_task(work)
        return job

    def save(self, job: J) -> None:
        self.records.save(job.id, job.record())

    def get(self, job_id: str) -> J | None:
        return self.jobs.get(job_id)

    def views(self) -> list[dict[str, Any]]:
        return self.records.views(self.jobs)

    def view(self, job_id: str) -> dict[str, Any] | None:
        return self.records.view(job_id, self.jobs)

    @property
    def restored(self) -> dict[str, dict[str, Any]]:
        return self.records.restored
