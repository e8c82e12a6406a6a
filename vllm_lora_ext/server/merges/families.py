"""The merge families behind ``POST /v1/merges``, one registry: each family checks a request
up front (refusing with 4xx) and runs the job. Classic: PEFT's data-free methods on the stored
adapters. IterIS: from the traffic statistics, with replays. Pool: adaptive / lorahub
(``pool.py``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import Field, ValidationError

from vllm_lora_ext.adapters.lora_weights import LoraWeights, load_lora, save_lora
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.jobs import iteris as iteris_job
from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.runners import run_to_end
from vllm_lora_ext.merge.iteris import IterisParams
from vllm_lora_ext.merge.methods import MERGE_METHODS, merge_adapters, validate_params
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.merges.job import MergeContext, MergeJob, MergeRequest
from vllm_lora_ext.server.merges.pool import PoolFamily


class MergeFamily(Protocol):
    methods: tuple[str, ...]

    async def check(self, ctx: MergeContext, request: MergeRequest) -> dict[str, Any]:
        """Refuse a request that cannot succeed; return fields to set on its new job."""
        ...

    async def run(
        self, ctx: MergeContext, job: MergeJob, work: Path
    ) -> tuple[LoraWeights, dict[str, Any]]:
        """The merged adapter and the params its recipe records."""
        ...


def named_adapters(ctx: MergeContext, request: MergeRequest) -> list[str]:
    """The adapters a classic or IterIS merge names: each once, each in the store."""
    if request.adapters == "all":
        raise Refused("invalid_merge", '"adapters": "all" is for adaptive / lorahub')
    names = [t.name for t in request.adapters]
    if len(set(names)) != len(names):
        raise Refused("invalid_merge", "an adapter is named twice")
    for name in names:
        if ctx.adapters.get(name) is None:
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
    return names


def load_named(ctx: MergeContext, job: MergeJob) -> list[LoraWeights]:
    """The adapters a classic or IterIS job names, read from the store, in request order."""
    assert job.request.adapters != "all"  # refused at submission
    job.phase = "loading"
    return [load_lora(ctx.adapters.store.path(t.name)) for t in job.request.adapters]


class ClassicFamily:
    """PEFT's ``add_weighted_adapter`` methods, numerically equal to PEFT's."""

    methods = tuple(sorted(MERGE_METHODS))

    async def check(self, ctx: MergeContext, request: MergeRequest) -> dict[str, Any]:
        named_adapters(ctx, request)
        try:
            validate_params(request.method, request.params)
        except (ValueError, ValidationError) as e:
            raise Refused("invalid_merge", f"bad params for {request.method}: {e}") from e
        return {}

    async def run(
        self, ctx: MergeContext, job: MergeJob, work: Path
    ) -> tuple[LoraWeights, dict[str, Any]]:
        request = job.request
        adapters = load_named(ctx, job)
        job.phase = "merging"
        checked = validate_params(request.method, request.params)
        weights = [t.weight for t in request.adapters]
        merged = await asyncio.to_thread(merge_adapters, adapters, weights, request.method, checked)
        return merged, checked.model_dump()


class IterisJobParams(IterisParams):
    """IterIS's solver knobs plus how much replayed traffic each iteration uses."""

    iterations: int = Field(default=1, ge=1, le=20, description="1 = traffic statistics only")
    prompts_per_adapter: int = Field(default=16, ge=1, le=1024)
    min_tokens: int = Field(default=64, ge=1, description="captured tokens needed per adapter")


class IterisFamily:
    """IterIS (arXiv 2411.15231) from the statistics captured in traffic, then replays."""

    methods = ("iteris",)

    async def check(self, ctx: MergeContext, request: MergeRequest) -> dict[str, Any]:
        names = named_adapters(ctx, request)
        params = _iteris_params(request.params)
        for name in names:
            if name in ctx.stats.capturing:
                raise Refused(
                    "capturing", f"stop the capture of {name!r} before merging with it", 409
                )
            have = ctx.stats.held_tokens(name)
            if have < params.min_tokens:
                raise Refused(
                    "invalid_merge",
                    f"IterIS needs {params.min_tokens} captured tokens per adapter; {name!r} has "
                    f"{have}. Capture traffic first: POST /v1/stats/{name}/start, serve "
                    "requests with it, then POST /v1/stats/{name}/stop",
                    409,
                )
            reservoir = ctx.stats.reservoirs.get(name)
            if params.iterations > 1 and (reservoir is None or not reservoir.items):
                raise Refused(
                    "invalid_merge",
                    f"IterIS iterations > 1 replay captured prompts; none are held for {name!r}",
                    409,
                )
        return {"iterations": params.iterations}

    async def run(
        self, ctx: MergeContext, job: MergeJob, work: Path
    ) -> tuple[LoraWeights, dict[str, Any]]:
        from vllm_lora_ext.stats.accumulators import IterisStats

        request = job.request
        adapters = load_named(ctx, job)
        params = _iteris_params(request.params)
        names = [t.name for t in request.adapters]
        manual = params.manual_weights or tuple(t.weight for t in request.adapters)
        solver = params.model_copy(update={"manual_weights": manual})
        modules = sorted({m for a in adapters for m in a.modules()})
        stats = IterisStats()
        for name in names:
            held = ctx.stats.held(name)
            assert held is not None  # checked at submission
            stats = stats + held
        merged: LoraWeights | None = None
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        try:
            for iteration in range(1, params.iterations + 1):
                job.iteration, job.phase = iteration, "solving"
                metrics.MERGE_ITERATION.labels(job=job.id).set(iteration)
                solved = await self._solve(ctx, job, work / f"solve-{iteration}", stats, solver)
                if merged is not None:
                    job.residual = _relative_change(merged, solved)
                merged = solved
                if iteration == params.iterations:
                    break
                job.phase = "replaying"
                candidate = work / f"candidate-{iteration}"
                save_lora(merged, candidate, base=ctx.adapters.base.name)
                paired = IterisStats()
                for name in names:
                    job.adapter, job.prompts_done = name, 0
                    prompts = ctx.stats.reservoirs[name].items[: params.prompts_per_adapter]
                    paired = paired + await ctx.replayer.paired_stats(
                        name, candidate, prompts, targets, job
                    )
                job.adapter = None
                stats = paired
        finally:
            if job.iteration:
                metrics.MERGE_ITERATION.remove(job.id)
        assert merged is not None
        return merged, params.model_dump() | {"manual_weights": list(manual)}

    @staticmethod
    async def _solve(
        ctx: MergeContext, job: MergeJob, folder: Path, stats: Any, solver: IterisJobParams
    ) -> LoraWeights:
        """One IterIS step as a job (out of this process by default): statistics to a file,
        the solve reads them with the adapters and the base weights, the merge comes back."""
        stats_file = folder / "stats.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(stats.save, stats_file)
        names = [t.name for t in job.request.adapters]
        spec = iteris_job.params(
            adapters={name: ctx.adapters.store.path(name) for name in names},
            model_dir=Path(ctx.replayer.model_dir),
            base_name=ctx.adapters.base.name,
            stats_file=stats_file,
            solver=_solver_params(solver).model_dump(mode="json"),
        )
        result = await run_to_end(ctx.runner, JobFolder(folder), "iteris_solve", spec)
        return await asyncio.to_thread(load_lora, Path(result["adapter_dir"]))


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


FAMILIES: dict[str, MergeFamily] = {
    method: family
    for family in (ClassicFamily(), IterisFamily(), PoolFamily())
    for method in family.methods
}
"""Method name -> the family that checks and runs it."""
METHODS = tuple(FAMILIES)
