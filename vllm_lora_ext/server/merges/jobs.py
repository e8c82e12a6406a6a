"""Merge jobs: ``POST /v1/merges`` validates, a background task merges, the store receives it.

A job reads its adapters from the store, merges them with the family its method belongs to
(``families.py``: PEFT's methods, IterIS from traffic statistics, pool merges), writes the
result with its ``recipe.json`` through :meth:`AdapterService.register_from_path` (staged,
validated, renamed, loaded: all or nothing), and from then on the merge is requested by name
like any adapter. Cancelling or failing leaves nothing registered.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_lora_ext.adapters.lora_weights import save_lora
from vllm_lora_ext.adapters.recipe import RECIPE_FILE, RECIPE_FORMAT, RECIPE_VERSION
from vllm_lora_ext.adapters.validation import validate_name
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.jobs.runners import JobRunner, SubprocessRunner
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.job_records import JOBS_DIR
from vllm_lora_ext.server.jobs import JobBook, new_job_id
from vllm_lora_ext.server.merges.families import FAMILIES, METHODS
from vllm_lora_ext.server.merges.job import MergeContext, MergeJob, MergeRequest, Replayer
from vllm_lora_ext.server.stats.service import StatsService

__all__ = ["METHODS", "MergeJob", "MergeJobs", "MergeRequest"]


class MergeJobs:
    def __init__(
        self,
        adapters: AdapterService,
        stats: StatsService,
        replayer: Replayer,
        records_dir: Path | None = None,
        server_stopping: Callable[[], bool] = lambda: False,
        runner: JobRunner | None = None,
    ) -> None:
        # Light merges (PEFT's methods) run in the API process, beside the engine's worker. One
        # thread: multi-threaded BLAS spinning against a busy worker made an SVD 90x slower
        # (0.12 s -> 11 s, measured). Heavy steps go to ``runner`` (a child process by default).
        torch.set_num_threads(1)
        self.context = MergeContext(adapters, stats, replayer, runner or SubprocessRunner())
        self.adapters = adapters
        self.server_stopping = server_stopping
        """True once the engine is going down: a job failing then was interrupted, not wrong."""
        self.book: JobBook[MergeJob] = JobBook(
            records_dir or adapters.store.root / JOBS_DIR / "merges", frozenset({"running"})
        )
        """This run's jobs, and those of earlier runs (finished, or ``interrupted``)."""

    def views(self) -> list[dict[str, Any]]:
        return self.book.views()

    def view(self, job_id: str) -> dict[str, Any] | None:
        return self.book.view(job_id)

    async def submit(self, request: MergeRequest) -> MergeJob:
        """Validate everything that can be checked up front (4xx), then start the job."""
        validate_name(request.name, reserved=self.adapters.base.aliases)
        if self.adapters.get(request.name) is not None or self._pending(request.name):
            raise Refused("duplicate_name", f"{request.name!r} already exists", 409)
        family = FAMILIES.get(request.method)
        if family is None:
            raise Refused(
                "invalid_merge", f"unknown method {request.method!r}; one of {', '.join(METHODS)}"
            )
        fields = await family.check(self.context, request)
        job = MergeJob(new_job_id(), request, **fields)
        assert request.adapters == "all" or job.pool or request.adapters
        names = job.pool or [t.name for t in request.adapters if request.adapters != "all"]
        for name in names:
            job.sources[name] = self.adapters.get(name).weights_sha256
        return self.book.start(job, self._run(job))

    def _pending(self, name: str) -> bool:
        return any(j.state == "running" and j.request.name == name for j in self.book.jobs.values())

    def cancel(self, job_id: str) -> MergeJob | None:
        job = self.book.get(job_id)
        if job is not None and job.state == "running" and job.task is not None:
            job.task.cancel()  # a running job is cancelled with it (jobs.runners.run_to_end)
        return job

    async def _run(self, job: MergeJob) -> None:
        request = job.request
        work = Path(tempfile.mkdtemp(prefix=".merge-", dir=self.adapters.store.root))
        try:
            merged, params = await FAMILIES[request.method].run(self.context, job, work)
            if merged.rank > self.adapters.max_rank:
                raise Refused(
                    "rank_too_high",
                    f"the merge has rank {merged.rank}; the server's max is "
                    f"{self.adapters.max_rank} (ask for a smaller params.rank)",
                )
            job.phase = "registering"
            out = work / "result"
            save_lora(merged, out, base=self.adapters.base.name)
            (out / RECIPE_FILE).write_text(json.dumps(self._recipe(job, params), indent=2))
            await self.adapters.register_from_path(request.name, out, origin=f"merge:{job.id}")
            job.state, job.phase = "succeeded", "done"
        except asyncio.CancelledError:
            job.state, job.phase = "cancelled", "cancelled"
        except Refused as e:
            job.state, job.error = "failed", e.message
        except Exception as e:  # a job must end in a state, whatever went wrong
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            if job.state != "succeeded" and self.server_stopping():
                job.state = "interrupted"
                job.error = f"the server stopped while the job ran ({job.error or job.phase})"
            job.finish()
            shutil.rmtree(work, ignore_errors=True)
            self.book.save(job)
            metrics.MERGE_JOBS.labels(method=request.method, state=job.state).inc()
            metrics.MERGE_SECONDS.labels(method=request.method).inc(
                job.finished_at - job.created_at
            )

    def _recipe(self, job: MergeJob, params: dict[str, Any]) -> dict[str, Any]:
        sources = []
        terms = (
            [(n, w) for n, w in job.result["weights"].items()]
            if job.result is not None
            else [(t.name, t.weight) for t in job.request.adapters]
        )
        for name, weight in terms:
            record = self.adapters.get(name)
            if record is None or record.weights_sha256 != job.sources[name]:
                raise Refused(
                    "invalid_merge",
                    f"adapter {name!r} was deleted or replaced while the merge ran; merge again",
                    409,
                )
            sources.append({"name": name, "weight": weight, "sha256": job.sources[name]})
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "method": job.request.method,
            "params": params,
            "base_model_name_or_path": self.adapters.base.name,
            "sources": sources,
            "job": job.id,
        }
