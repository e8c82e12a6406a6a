"""IterIS replays: captured prompts sent to the served engine under an adapter and a candidate
merge, their layer inputs paired token by token in the worker.

Each prompt goes once to each model, one prompt at a time, with a fresh ``cache_salt`` so the
prefix cache cannot skip tokens; the worker's recorder keeps rows per LoRA id in arrival
order, so the two row lists align. Requests go over HTTP to this very server: the replay is
served exactly as users are.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Protocol

import httpx
from safetensors.torch import load

from vllm_lora_ext.auth import bearer
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.stats.accumulators import InputStats, IterisStats


class RecordingEngine(Protocol):
    async def lora_id(self, name: str) -> int: ...
    async def record_start(self, lora_ids: list[int], targets: list[str]) -> None: ...
    async def record_take(self, own_id: int, merged_id: int) -> bytes: ...
    async def record_stop(self) -> None: ...


class HttpReplayer:
    def __init__(
        self,
        url: str,
        engine: RecordingEngine,
        adapters: AdapterService,
        model_dir: Path,
        api_key: str | None = None,
    ) -> None:
        self.url = url
        self.headers = bearer(api_key)
        """For calls to this very server (it may require its ``--api-key``)."""
        self.engine = engine
        self.adapters = adapters
        self.model_dir = model_dir

    async def paired_stats(
        self, own: str, merged_dir: Path, prompts: list[dict], targets: list[str], job: Any
    ) -> IterisStats:
        temp = f"iteris-tmp-{job.id}"
        await self.adapters.ensure_loaded(own)
        await self.adapters.engine.load(temp, merged_dir)
        out = IterisStats()
        try:
            own_id, temp_id = await self.engine.lora_id(own), await self.engine.lora_id(temp)
            await self.engine.record_start([own_id, temp_id], targets)
            async with httpx.AsyncClient(
                base_url=self.url, headers=self.headers, timeout=600.0
            ) as client:
                for prompt in prompts:
                    await asyncio.gather(_send(client, own, prompt), _send(client, temp, prompt))
                    data = await self.engine.record_take(own_id, temp_id)
                    out = out + _paired(own, data)
                    job.prompts_done += 1
        finally:
            await self.engine.record_stop()
            await self.adapters.engine.unload(temp)
        return out


async def _send(client: httpx.AsyncClient, model: str, prompt: dict) -> None:
    path = "/v1/chat/completions" if "messages" in prompt else "/v1/completions"
    body = {**prompt, "model": model, "max_tokens": 1, "cache_salt": uuid.uuid4().hex}
    r = await client.post(path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"replay request answered {r.status_code}: {r.text[:300]}")


def _paired(adapter: str, data: bytes) -> IterisStats:
    tensors = load(data)
    layers = {k.rsplit("#", 1)[0] for k in tensors}
    entries = {}
    for layer in layers:
        rows = int(tensors[f"{layer}#rows"])
        entries[(adapter, layer)] = InputStats(
            xtx=tensors[f"{layer}#xtx"],
            tokens=rows,
            cross=tensors[f"{layer}#cross"],
            merged=tensors[f"{layer}#merged"],
            paired_tokens=rows,
        )
    return IterisStats(entries)
