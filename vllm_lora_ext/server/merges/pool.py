"""``POST /v1/merges`` with ``method: "adaptive"`` or ``"lorahub"``: a merge from an adapter pool
for a new task, its controls reported in the job's ``result``.

The pool is ``"adapters": "all"`` (every adapter of this base in the store) or a list of names;
the target examples come in ``params.examples`` (``[{"input", "output"}]``) or from an adapter's
request reservoir (``params.from_reservoir``: the prompts captured from that adapter's traffic,
answered greedily by that adapter through this server, i.e. its own outputs as labels). The
work runs in a thread on the base model loaded with transformers (:mod:`merge.pool_merge`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_lora_ext.adapters.lora_weights import LoraWeights, load_lora
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.jobs import pool as pool_job
from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.runners import run_to_end
from vllm_lora_ext.merge.params import MergeParams
from vllm_lora_ext.merge.pool_merge import (
    MIN_EXAMPLES,
    PARAMS,
    AdaptiveParams,
    LorahubParams,
    PoolMergeParams,
)
from vllm_lora_ext.server.merges.job import MergeContext, MergeJob, MergeRequest

POOL_METHODS = tuple(PARAMS)


class TargetExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class _Target(MergeParams):
    examples: list[TargetExample] | None = None
    from_reservoir: str | None = None
    reservoir_max_tokens: int = Field(default=32, ge=1, le=512)

    @model_validator(mode="after")
    def _one_source(self) -> _Target:
        if (self.examples is None) == (self.from_reservoir is None):
            raise ValueError("give exactly one of params.examples and params.from_reservoir")
        return self


class AdaptiveJobParams(_Target, AdaptiveParams):
    pass


class LorahubJobParams(_Target, LorahubParams):
    pass


_JOB_PARAMS: dict[str, type[_Target]] = {"adaptive": AdaptiveJobParams, "lorahub": LorahubJobParams}


def job_params(method: str, raw: dict[str, Any]) -> _Target:
    try:
        return _JOB_PARAMS[method].model_validate(raw)
    except ValidationError as e:
        raise Refused("invalid_merge", f"bad params for {method}: {e}") from e


def method_params(method: str, params: _Target) -> PoolMergeParams:
    cls = PARAMS[method]
    return cls.model_validate(params.model_dump(include=set(cls.model_fields)))


class PoolFamily:
    """adaptive / lorahub: a merge from a pool for a new task, with its controls."""

    methods = POOL_METHODS

    async def check(self, ctx: MergeContext, request: MergeRequest) -> dict[str, Any]:
        return {"pool": check_pool_request(ctx, request)}

    async def run(
        self, ctx: MergeContext, job: MergeJob, work: Path
    ) -> tuple[LoraWeights, dict[str, Any]]:
        return await run_pool_job(ctx, job, job.pool, work)


def check_pool_request(ctx: MergeContext, request: MergeRequest) -> list[str]:
    """The pool's adapter names; Refused (4xx) for anything wrong up front."""
    params = job_params(request.method, request.params)
    service = ctx.adapters
    if request.adapters == "all":
        pool = [a.name for a, _ in service.list() if a.name != request.name]
    else:
        pool = [t.name for t in request.adapters]
        if len(set(pool)) != len(pool):
            raise Refused("invalid_merge", "an adapter is named twice")
        for name in pool:
            if service.get(name) is not None:
                continue
            other = service.store.get(name)
            if other is not None:
                raise Refused(
                    "wrong_base",
                    f"adapter {name!r} belongs to base {other.base!r}, not to the served "
                    f"{service.base.name!r}: a pool must hold adapters of this base",
                )
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
    if params.k > len(pool):
        raise Refused("invalid_merge", f"k={params.k} but the pool holds {len(pool)} adapters")
    smallest = sum(sorted(service.get(n).rank for n in pool)[: params.k])
    if smallest > service.max_rank:
        raise Refused(
            "rank_too_high",
            f"the merge of k={params.k} adapters has rank >= {smallest} (the sum of their "
            f"ranks); the server's max is {service.max_rank}: ask for a smaller k",
        )
    if params.examples is not None and len(params.examples) < MIN_EXAMPLES:
        raise Refused(
            "invalid_merge",
            f"{len(params.examples)} target examples; at least {MIN_EXAMPLES} are needed",
        )
    if params.from_reservoir is not None:
        name = params.from_reservoir
        if service.get(name) is None:
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
        reservoir = ctx.stats.reservoirs.get(name)
        held = sum(1 for p in reservoir.items if _text_of(p)) if reservoir is not None else 0
        if held < MIN_EXAMPLES:
            raise Refused(
                "invalid_merge",
                f"the reservoir of {name!r} holds {held} text prompts; at least {MIN_EXAMPLES} "
                f"are needed (capture traffic: POST /v1/stats/{name}/start, serve requests)",
                409,
            )
    return pool


async def run_pool_job(
    ctx: MergeContext, job: MergeJob, pool: list[str], work: Path
) -> tuple[LoraWeights, dict[str, Any]]:
    """Run the merge and its controls as a job (out of this process by default); the report
    goes to ``job.result``."""
    method = job.request.method
    params = job_params(method, job.request.params)
    model_dir = Path(ctx.replayer.model_dir)
    if params.examples is not None:
        examples = [(e.input, e.output) for e in params.examples]
    else:
        job.phase = "labelling reservoir prompts"
        examples = await _reservoir_examples(ctx, params, model_dir, job)
    job.phase = "merging"

    def progress(p: dict[str, Any]) -> None:
        job.phase = p.get("phase", job.phase)
        job.iteration, job.iterations = p.get("done", 0), p.get("total", job.iterations)

    spec = pool_job.params(
        model_dir=model_dir,
        base_name=ctx.adapters.base.name,
        adapters={name: ctx.adapters.store.path(name) for name in pool},
        examples=examples,
        method=method,
        method_params=method_params(method, params).model_dump(mode="json"),
    )
    result = await run_to_end(
        ctx.runner, JobFolder(work / "pool"), "pool_merge", spec, on_progress=progress
    )
    merged = await asyncio.to_thread(load_lora, Path(result["adapter_dir"]))
    job.result = result["report"] | {"pool": pool}
    dumped = params.model_dump(exclude={"examples"})
    dumped["examples"] = len(examples)
    return merged, dumped | {"selected": result["selected"], "controls": result["controls"]}


async def _reservoir_examples(
    ctx: MergeContext, params: _Target, model_dir: Path, job: MergeJob
) -> list[tuple[str, str]]:
    """(input, the adapter's greedy answer) for each reservoir prompt that carries text."""
    from transformers import AutoTokenizer

    from vllm_lora_ext.evaluation.prompts import stop_token_ids
    from vllm_lora_ext.migrate.queries import query_prompt, read_answer

    name = params.from_reservoir
    assert name is not None
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, model_dir)
    texts = [t for t in map(_text_of, ctx.stats.reservoirs[name].items) if t]
    pairs = []
    async with httpx.AsyncClient(
        base_url=ctx.replayer.url, headers=ctx.replayer.headers, timeout=600.0
    ) as client:
        for i, text in enumerate(texts):
            job.iteration, job.iterations = i, len(texts)
            prompt = query_prompt(tokenizer, text)
            body = {
                "model": name,
                "prompt": list(prompt.ids),
                "max_tokens": params.reservoir_max_tokens,
                "temperature": 0.0,
                "stop_token_ids": list(stop_token_ids(tokenizer)),
            }
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"labelling answered {r.status_code}: {r.text[:300]}")
            answer = read_answer(r.json()["choices"][0]["text"], prompt)
            if answer:
                pairs.append((text, answer))
    return pairs


def _text_of(prompt: dict[str, Any]) -> str | None:
    """The user text of a reservoir prompt: a completion's string, or a chat's last user turn
    (token-id prompts are skipped: re-framing decoded ids as a question would change them)."""
    if isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    for message in reversed(prompt.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return None
