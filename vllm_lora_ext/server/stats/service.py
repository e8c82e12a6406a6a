"""Traffic statistics per adapter: start / stop captures in the worker, hold, export, import.

The worker accumulates ``XᵀX`` while a capture runs (:mod:`vllm_lora_ext.stats.capture`);
stopping it moves the sums here, where they are kept on disk under ``<store>/.stats/`` and
summed with imports from other replicas. The API process also keeps a reservoir of the
prompts it served with each captured adapter, for IterIS replays, pool merges and migrations;
it is saved beside the statistics when the capture stops (``<name>.prompts.json``), so a
restart keeps both. Deleting the adapter deletes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.files import write_atomic
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.stats.accumulators import IterisStats
from vllm_lora_ext.stats.reservoir import Reservoir, prompt_of_body

STATS_DIR = ".stats"
PROMPTS_SUFFIX = ".prompts.json"
logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines


class CaptureEngine(Protocol):
    """The worker calls (``collective_rpc``), implemented in ``vllm_boundary/api/engine.py``."""

    async def lora_id(self, name: str) -> int: ...
    async def start(self, request: dict[str, Any], memory_budget_bytes: int) -> dict: ...
    async def stop(self, lora_id: int) -> dict: ...
    async def status(self) -> list[dict]: ...
    async def export(self, lora_id: int, adapter: str) -> bytes | None: ...


@dataclass
class CaptureSettings:
    token_budget: int
    sample_rate: float
    seed: int


class StatsService:
    def __init__(
        self,
        adapters: AdapterService,
        engine: CaptureEngine,
        memory_budget_bytes: int,
        reservoir_size: int,
        stats_dir: Path | None = None,
    ) -> None:
        self.adapters = adapters
        self.engine = engine
        self.memory_budget_bytes = memory_budget_bytes
        self.reservoir_size = reservoir_size
        # Not in a store shared by replicas: each would add its capture to the others' file.
        self.dir = stats_dir if stats_dir is not None else adapters.store.root / STATS_DIR
        self.capturing: dict[str, int] = {}
        """adapter name -> LoRA int id, for captures running in the worker."""
        self.reservoirs: dict[str, Reservoir] = self._load_reservoirs()
        self._lock = asyncio.Lock()
        adapters.on_remove.append(self.forget)

    def _load_reservoirs(self) -> dict[str, Reservoir]:
        out = {}
        for path in self.dir.glob(f"*{PROMPTS_SUFFIX}"):
            name = path.name.removesuffix(PROMPTS_SUFFIX)
            try:
                out[name] = Reservoir.from_json(json.loads(path.read_text()), self.reservoir_size)
            except (OSError, ValueError, TypeError, AttributeError):
                logger.warning("vllm-lora-ext: unreadable prompt reservoir %s skipped", path)
        return out

    def _save_reservoir(self, name: str) -> None:
        reservoir = self.reservoirs.get(name)
        if reservoir is not None:
            data = json.dumps(reservoir.to_json()).encode()
            write_atomic(self.dir / f"{name}{PROMPTS_SUFFIX}", data)

    def forget(self, name: str) -> None:
        """The adapter was deleted or replaced: its statistics and prompts no longer apply."""
        self._drop_held(name)
        with contextlib.suppress(KeyError):  # no gauge for an adapter never captured
            metrics.STATS_HELD_TOKENS.remove(name)

    def _drop_held(self, name: str) -> bool:
        """Delete the statistics and prompts held for ``name``; whether there were any."""
        had_prompts = self.reservoirs.pop(name, None) is not None
        (self.dir / f"{name}{PROMPTS_SUFFIX}").unlink(missing_ok=True)
        stats = self.dir / f"{name}.safetensors"
        had_stats = stats.exists()
        stats.unlink(missing_ok=True)
        return had_prompts or had_stats

    # -- captures ---------------------------------------------------------------------------

    async def start(self, name: str, settings: CaptureSettings) -> dict:
        record = self._adapter(name)
        async with self._lock:
            await self.adapters.ensure_loaded(name)
            lora_id = await self.engine.lora_id(name)
            request = {
                "lora_id": lora_id,
                "targets": tuple(record.target_modules),
                "token_budget": settings.token_budget,
                "sample_rate": settings.sample_rate,
                "seed": settings.seed,
            }
            try:
                await self.engine.start(request, self.memory_budget_bytes)
            except ValueError as e:  # the worker's budget refusal, re-raised by collective_rpc
                raise Refused("stats_budget", str(e), status=409) from e
            self.capturing[name] = lora_id
            metrics.CAPTURES_RUNNING.set(len(self.capturing))
            self.reservoirs.setdefault(name, Reservoir(self.reservoir_size, settings.seed))
        return await self.describe(name)

    async def stop(self, name: str) -> dict:
        self._adapter(name)
        async with self._lock:
            lora_id = self.capturing.pop(name, None)
            if lora_id is None:
                raise Refused("not_capturing", f"no capture runs for {name!r}", 409)
            metrics.CAPTURES_RUNNING.set(len(self.capturing))
            data = await self.engine.export(lora_id, name)
            await self.engine.stop(lora_id)
            if data is not None:
                held = self.held(name)
                live = IterisStats.from_bytes(data)
                await asyncio.to_thread(self._save, name, live if held is None else held + live)
            await asyncio.to_thread(self._save_reservoir, name)
        return await self.describe(name)

    def observe_request(self, model: object, body: bytes) -> None:
        """Called for each generation request: sample the prompts of captured adapters."""
        if not isinstance(model, str) or model not in self.capturing:
            return
        try:
            parsed = json.loads(body)
        except ValueError:
            return
        reservoir = self.reservoirs.get(model)
        for prompt in prompt_of_body(parsed) if isinstance(parsed, dict) and reservoir else ():
            reservoir.offer(prompt)

    # -- held statistics ----------------------------------------------------------------------

    def held_tokens(self, name: str) -> int:
        """Captured tokens held for ``name``, read from the file's header only."""
        path = self.dir / f"{name}.safetensors"
        return IterisStats.summary(path).tokens.get(name, 0) if path.exists() else 0

    def held(self, name: str) -> IterisStats | None:
        path = self.dir / f"{name}.safetensors"
        return IterisStats.load(path) if path.exists() else None

    async def snapshot(self, name: str) -> IterisStats | None:
        """Held statistics plus what a running capture has gathered so far."""
        self._adapter(name)
        held = self.held(name)
        lora_id = self.capturing.get(name)
        if lora_id is None:
            return held
        data = await self.engine.export(lora_id, name)
        if data is None:
            return held
        live = IterisStats.from_bytes(data)
        return live if held is None else held + live

    async def import_bytes(self, name: str, data: bytes) -> dict:
        self._adapter(name)
        try:
            incoming = IterisStats.from_bytes(data)
        except ValueError as e:
            raise Refused("invalid_stats", f"not a statistics export: {e}") from e
        others = sorted({a for a, _ in incoming.entries} - {name})
        if others:
            raise Refused(
                "invalid_stats", f"the export holds statistics of {others}, not of {name!r}"
            )
        async with self._lock:
            held = self.held(name)
            try:
                total = incoming if held is None else held + incoming
            except ValueError as e:
                raise Refused("invalid_stats", str(e)) from e
            await asyncio.to_thread(self._save, name, total)
        return await self.describe(name)

    async def clear(self, name: str) -> bool:
        self._adapter(name)
        if name in self.capturing:
            raise Refused("capturing", f"stop the capture of {name!r} first", 409)
        return self._drop_held(name)

    def _save(self, name: str, stats: IterisStats) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stats.save(self.dir / f"{name}.safetensors")
        metrics.STATS_HELD_TOKENS.labels(adapter=name).set(stats.tokens(name))

    # -- status -----------------------------------------------------------------------------

    async def describe(self, name: str) -> dict:
        live = {s["lora_id"]: s for s in await self.engine.status()}
        return self._describe(name, live)

    async def describe_all(self) -> list[dict]:
        live = {s["lora_id"]: s for s in await self.engine.status()}
        names = sorted(set(self.capturing) | {p.stem for p in self.dir.glob("*.safetensors")})
        return [self._describe(n, live) for n in names]

    def _describe(self, name: str, live: dict[int, dict]) -> dict:
        path = self.dir / f"{name}.safetensors"
        held = IterisStats.summary(path) if path.exists() else None
        running = live.get(self.capturing.get(name, -1))
        reservoir = self.reservoirs.get(name)
        return {
            "adapter": name,
            "capturing": running is not None,
            "held_tokens": held.tokens.get(name, 0) if held is not None else 0,
            "live_tokens": running["captured_tokens"] if running else 0,
            "seen_tokens": running["seen_tokens"] if running else 0,
            "token_budget": running["token_budget"] if running else None,
            "layers": held.layers.get(name, 0) if held else (running or {}).get("layers", 0),
            "bytes": (held.nbytes if held is not None else 0) + (running or {}).get("bytes", 0),
            "reservoir_prompts": len(reservoir.items) if reservoir else 0,
        }

    def _adapter(self, name: str) -> Any:
        record = self.adapters.get(name)
        if record is None:
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
        return record
