"""Merge jobs: ``POST /v1/merges`` validates, a background task merges, the store receives it.

A job reads its adapters from the store, merges them (a classic method from
:mod:`vllm_lora_ext.merge.methods`, or IterIS fed by the statistics captured from traffic),
writes the result with its ``recipe.json`` through :meth:`AdapterService.register_from_path`
(staged, validated, renamed, loaded: all or nothing), and from then on the merge is requested
by name like any adapter. Cancelling or failing leaves nothing registered.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_lora_ext.adapters.lora_weights import LoraWeights, load_lora, save_lora
from vllm_lora_ext.adapters.validation import validate_name
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.merge.iteris import IterisParams
from vllm_lora_ext.merge.methods import MERGE_METHODS, merge_adapters, validate_params
from vllm_lora_ext.merge.offline import RECIPE_FILE, RECIPE_FORMAT, RECIPE_VERSION
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.job_records import JOBS_DIR, JobRecords
from vllm_lora_ext.server.merges.pool import POOL_METHODS, check_pool_request, run_pool_job
from vllm_lora_ext.server.stats.service import StatsService

State = Literal["running", "succeeded", "failed", "cancelled", "interrupted"]
METHODS = (*sorted(MERGE_METHODS), "iteris", *POOL_METHODS)


class MergeTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = Field(1.0, allow_inf_nan=False)


class IterisJobParams(IterisParams):
    """IterIS's solver knobs plus how much replayed traffic each iteration uses."""

    iterations: int = Field(default=1, ge=1, le=20, description="1 = traffic statistics only")
    prompts_per_adapter: int = Field(default=16, ge=1, le=1024)
    min_tokens: int = Field(default=64, ge=1, description="captured tokens needed per adapter")


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
class MergeJob:
    id: str
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
    stopping: bool = False
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    task: asyncio.Task | None = None

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
    """Runs IterIS replays on the served engine (``plugin.py`` / HTTP to ourselves)."""

    url: str
    headers: dict[str, str]
    model_dir: Path

    async def paired_stats(
        self, own: str, merged_dir: Path, prompts: list[dict], targets: list[str], job: MergeJob
    ) -> Any: ...

    def base_weights(self, modules: list[str]) -> dict[str, Any]: ...


class MergeJobs:
    def __init__(
        self,
        adapters: AdapterService,
        stats: StatsService,
        replayer: Replayer,
        records_dir: Path | None = None,
        server_stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        # Merges run in the API process, beside the engine's worker. One thread: multi-threaded
        # BLAS spinning against a busy worker made an SVD 90x slower (0.12 s -> 11 s, measured).
        torch.set_num_threads(1)
        self.adapters = adapters
        self.stats = stats
        self.replayer = replayer
        self.jobs: dict[str, MergeJob] = {}
        self.server_stopping = server_stopping
        """True once the engine is going down: a job failing then was interrupted, not wrong."""
        self.records = JobRecords(
            records_dir or adapters.store.root / JOBS_DIR / "merges", frozenset({"running"})
        )
        """Jobs of earlier runs of this server (finished, or ``interrupted`` by its stop)."""

    def views(self) -> list[dict[str, Any]]:
        return self.records.views(self.jobs)

    def view(self, job_id: str) -> dict[str, Any] | None:
        return self.records.view(job_id, self.jobs)

    def _start(self, job: MergeJob) -> MergeJob:
        self.jobs[job.id] = job
        self.records.save(job.id, job.view())
        job.task = asyncio.create_task(self._run(job))
        return job

    # -- submission ---------------------------------------------------------------------------

    async def submit(self, request: MergeRequest) -> MergeJob:
        """Validate everything that can be checked up front (4xx), then start the job."""
        validate_name(request.name, reserved=self.adapters.base.aliases)
        if self.adapters.get(request.name) is not None or self._pending(request.name):
            raise Refused("duplicate_name", f"{request.name!r} already exists", 409)
        if request.method in POOL_METHODS:
            job = MergeJob(uuid.uuid4().hex[:12], request, pool=check_pool_request(self, request))
            return self._start(job)
        if request.adapters == "all":
            raise Refused("invalid_merge", '"adapters": "all" is for adaptive / lorahub')
        names = [t.name for t in request.adapters]
        if len(set(names)) != len(names):
            raise Refused("invalid_merge", "an adapter is named twice")
        for name in names:
            if self.adapters.get(name) is None:
                raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
        job = MergeJob(uuid.uuid4().hex[:12], request)
        if request.method == "iteris":
            params = _iteris_params(request.params)
            await self._check_iteris_inputs(names, params)
            job.iterations = params.iterations
        elif request.method in MERGE_METHODS:
            try:
                validate_params(request.method, request.params)
            except (ValueError, ValidationError) as e:
                raise Refused("invalid_merge", f"bad params for {request.method}: {e}") from e
        else:
            raise Refused(
                "invalid_merge", f"unknown method {request.method!r}; one of {', '.join(METHODS)}"
            )
        return self._start(job)

    def _pending(self, name: str) -> bool:
        return any(j.state == "running" and j.request.name == name for j in self.jobs.values())

    async def _check_iteris_inputs(self, names: list[str], params: IterisJobParams) -> None:
        for name in names:
            if name in self.stats.capturing:
                raise Refused(
                    "capturing", f"stop the capture of {name!r} before merging with it", 409
                )
            have = self.stats.held_tokens(name)
            if have < params.min_tokens:
                raise Refused(
                    "invalid_merge",
                    f"IterIS needs {params.min_tokens} captured tokens per adapter; {name!r} has "
                    f"{have}. Capture traffic first: POST /v1/stats/{name}/start, serve "
                    "requests with it, then POST /v1/stats/{name}/stop",
                    409,
                )
            reservoir = self.stats.reservoirs.get(name)
            if params.iterations > 1 and (reservoir is None or not reservoir.items):
                raise Refused(
                    "invalid_merge",
                    f"IterIS iterations > 1 replay captured prompts; none are held for {name!r}",
                    409,
                )

    def cancel(self, job_id: str) -> MergeJob | None:
        job = self.jobs.get(job_id)
        if job is not None and job.state == "running" and job.task is not None:
            job.stopping = True  # ends a training loop running in a thread
            job.task.cancel()
        return job

    # -- execution ----------------------------------------------------------------------------

    async def _run(self, job: MergeJob) -> None:
        request = job.request
        work = Path(tempfile.mkdtemp(prefix=".merge-", dir=self.adapters.store.root))
        try:
            if request.method in POOL_METHODS:
                merged, params = await run_pool_job(self, job, job.pool)
            else:
                merged, params = await self._merge_terms(job, work)
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
            job.finished_at = time.time()
            shutil.rmtree(work, ignore_errors=True)
            self.records.save(job.id, job.view())
            metrics.MERGE_JOBS.labels(method=request.method, state=job.state).inc()
            metrics.MERGE_SECONDS.labels(method=request.method).inc(
                job.finished_at - job.created_at
            )
            if request.method == "iteris" and job.iteration:
                metrics.MERGE_ITERATION.remove(job.id)

    async def _merge_terms(self, job: MergeJob, work: Path) -> tuple[LoraWeights, dict[str, Any]]:
        """A classic method or IterIS over the adapters named with their weights."""
        request = job.request
        assert request.adapters != "all"  # refused at submission
        job.phase = "loading"
        adapters = [load_lora(self.adapters.store.path(t.name)) for t in request.adapters]
        if request.method == "iteris":
            return await self._iteris(job, adapters, work)
        job.phase = "merging"
        checked = validate_params(request.method, request.params)
        weights = [t.weight for t in request.adapters]
        merged = await asyncio.to_thread(merge_adapters, adapters, weights, request.method, checked)
        return merged, checked.model_dump()

    def _recipe(self, job: MergeJob, params: dict[str, Any]) -> dict[str, Any]:
        sources = []
        terms = (
            [(n, w) for n, w in job.result["weights"].items()]
            if job.result is not None
            else [(t.name, t.weight) for t in job.request.adapters]
        )
        for name, weight in terms:
            record = self.adapters.get(name)
            sources.append({"name": name, "weight": weight, "sha256": record.weights_sha256})
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "method": job.request.method,
            "params": params,
            "base_model_name_or_path": self.adapters.base.name,
            "sources": sources,
            "job": job.id,
        }

    async def _iteris(
        self, job: MergeJob, adapters: list[LoraWeights], work: Path
    ) -> tuple[LoraWeights, dict[str, Any]]:
        from vllm_lora_ext.merge.iteris import iteris_merge
        from vllm_lora_ext.stats.accumulators import IterisStats

        params = _iteris_params(job.request.params)
        names = [t.name for t in job.request.adapters]
        manual = params.manual_weights or tuple(t.weight for t in job.request.adapters)
        solver = params.model_copy(update={"manual_weights": manual})
        modules = sorted({m for a in adapters for m in a.modules()})
        job.phase = "reading base weights"
        base = await asyncio.to_thread(self.replayer.base_weights, modules)
        stats = IterisStats()
        for name in names:
            held = self.stats.held(name)
            assert held is not None  # checked at submission
            stats = stats + held
        merged: LoraWeights | None = None
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        for iteration in range(1, params.iterations + 1):
            job.iteration, job.phase = iteration, "solving"
            metrics.MERGE_ITERATION.labels(job=job.id).set(iteration)
            result = await asyncio.to_thread(
                iteris_merge, adapters, names, base, stats, _solver_params(solver)
            )
            if merged is not None:
                job.residual = _relative_change(merged, result.weights)
            merged = result.weights
            if iteration == params.iterations:
                break
            job.phase = "replaying"
            candidate = work / f"candidate-{iteration}"
            save_lora(merged, candidate, base=self.adapters.base.name)
            paired = IterisStats()
            for name in names:
                job.adapter, job.prompts_done = name, 0
                prompts = self.stats.reservoirs[name].items[: params.prompts_per_adapter]
                paired = paired + await self.replayer.paired_stats(
                    name, candidate, prompts, targets, job
                )
            job.adapter = None
            stats = paired
        assert merged is not None
        return merged, params.model_dump() | {"manual_weights": list(manual)}


def _iteris_params(raw: dict[str, Any]) -> IterisJobParams:
    try:
        return IterisJobParams.model_validate(raw)
    except ValidationError as e:
        raise Refused("invalid_merge", f"bad params for iteris: {e}") from e


def _solver_params(params: IterisJobParams) -> IterisParams:
    return IterisParams.model_validate(params.model_dump(include=set(IterisParams.model_fields)))


def _relative_change(old: LoraWeights, new: LoraWeights) -> float:
    num = den = 0.0
    for module in new.modules():
        dense = new.delta(module, torch.float64)
        previous = old.delta(module, torch.float64)
        num += float((dense - previous).square().sum())
        den += float(dense.square().sum())
    return (num / den) ** 0.5 if den else 0.0
