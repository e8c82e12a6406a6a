"""Inline merges: a request for ``merge:a=0.7,b=0.3`` served as a cat-merged adapter.

:class:`InlineMerges` is the one owner of them: the prefix, parsing (:meth:`MergeSpec.parse`),
the check against the store (every source known, the ranks' sum within ``--max-lora-rank``),
materialising the merge into the byte-bounded cache (:class:`MergedCache`), marking an entry
used, evicting the least recently used (unloading each from vLLM first), and dropping the
entries built from a deleted or replaced adapter. The gateway checks a request's merge and
marks it used, the store resolver materialises it, :class:`AdapterService` drops what a
removed adapter leaves behind; none of them reads a merge name itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.lora_weights import load_lora, save_lora
from vllm_lora_ext.adapters.merged_cache import MergedCache
from vllm_lora_ext.adapters.store import AdapterStore, StoredAdapter
from vllm_lora_ext.adapters.validation import inspect_adapter_dir
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.merge.cat import cat_merge
from vllm_lora_ext.merge.spec import PREFIX, MergeSpec
from vllm_lora_ext.server import metrics

logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines


class MergeEngine(Protocol):
    """What eviction needs of the engine."""

    async def unload(self, name: str) -> bool: ...
    def loaded_names(self) -> set[str]: ...


def is_merge(name: object) -> bool:
    """Whether a requested model names an inline merge (``merge:...``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def served_from(loaded: str, name: str) -> bool:
    """Whether the loaded model ``loaded`` (an adapter or an inline merge) uses ``name``."""
    if is_merge(loaded):
        return name in dict(MergeSpec.parse(loaded).terms)
    return loaded == name


class InlineMerges:
    def __init__(
        self,
        store: AdapterStore,
        base: BaseModelInfo,
        max_rank: int,
        engine: MergeEngine,
        lookup: Callable[[str], StoredAdapter | None],
        lock: asyncio.Lock,
        enabled: bool = True,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.store = store
        self.base = base
        self.max_rank = max_rank
        self.engine = engine
        self.lookup = lookup
        """A source adapter's record by name (None: unknown, or being deleted)."""
        self.lock = lock
        """The adapter service's lock: an eviction's unloads never interleave with a delete."""
        self.enabled = enabled
        self.cache = MergedCache(store.root, cache_bytes)
        self._names: dict[str, set[str]] = {}
        """Cache key -> the ``merge:...`` names vLLM may hold it under."""
        self._evictions: set[asyncio.Task] = set()

    def check(self, merge_name: str) -> tuple[MergeSpec, list[StoredAdapter]]:
        """A merge this server can serve: its spec and each source's record, in the spec's
        order; :class:`Refused` otherwise. The gateway calls it before vLLM sees the request,
        and :meth:`materialise` again (a source may have gone meanwhile).

        400 ``inline_merges_off``, ``invalid_merge`` / ``non_finite`` (:meth:`MergeSpec.parse`)
        or ``rank_too_high``; 404 ``unknown_adapter`` naming the first unknown source.
        """
        if not self.enabled:
            raise Refused(
                "inline_merges_off",
                "inline merges are turned off on this server (VLLM_LORA_EXT_INLINE_MERGES); "
                "register the merge by name with POST /v1/merges",
            )
        spec = MergeSpec.parse(merge_name)
        records = []
        for name, _ in spec.terms:
            record = self.lookup(name)
            if record is None:
                raise Refused(
                    "unknown_adapter", f"the inline merge names unknown adapter {name!r}", 404
                )
            records.append(record)
        total_rank = sum(r.rank for r in records)
        if total_rank > self.max_rank:
            raise Refused(
                "rank_too_high",
                f"the merge has rank {total_rank} (sum of ranks); the server's max is "
                f"{self.max_rank}",
            )
        return spec, records

    def materialise(self, merge_name: str) -> Path:
        """The cat-merged adapter for ``merge:a=w,...`` as a PEFT dir, built once and cached.

        The cache key covers each adapter's weight hash, so re-registering a name under new
        weights never serves a stale merge. Runs in a thread (the resolver); the cache is
        brought back under its byte budget afterwards (:meth:`evict`).
        """
        spec, records = self.check(merge_name)
        key = hashlib.sha256(
            (spec.canonical + "".join(r.weights_sha256 for r in records)).encode()
        ).hexdigest()[:32]
        self._names.setdefault(key, set()).add(merge_name)
        if (target := self.cache.hit(key)) is not None:
            return target
        merged = cat_merge(
            [load_lora(self.store.path(n)) for n, _ in spec.terms], [w for _, w in spec.terms]
        )
        with self.store.staging() as staged:
            save_lora(merged, staged, base=self.base.name)
            inspect_adapter_dir(staged, self.base, self.max_rank)
            terms = zip(records, spec.terms, strict=True)
            sources = [(r.name, w, r.weights_sha256) for r, (_, w) in terms]
            return self.cache.commit(staged, key, self.cache.recipe(sources))

    def touch(self, merge_name: str) -> None:
        """A request for a merge vLLM holds: its entry is the most recently used."""
        # A copy: the resolver adds entries from its thread (materialise).
        for key, names in list(self._names.items()):
            if merge_name in names:
                self.cache.touch(key)
                return

    def schedule_eviction(self, keep: Path) -> None:
        """Bring the cache under its budget soon, in the event loop (the resolver that built
        ``keep`` holds vLLM's lock on that name: unloading under it could deadlock)."""
        task = asyncio.get_running_loop().create_task(self.evict(keep.name))
        self._evictions.add(task)  # tasks run one at a time (the lock)
        task.add_done_callback(self._evictions.discard)

    async def evict(self, keep: str | None = None) -> int:
        """Drop least recently used entries over the budget: unload each from vLLM (after its
        admitted requests), then delete its files. Returns the entries dropped."""
        async with self.lock:
            victims = self.cache.over_budget(keep)
            for entry in victims:
                for merge_name in self._names.pop(entry.key, set()):
                    if merge_name in self.engine.loaded_names():
                        await self.engine.unload(merge_name)
                        metrics.ADAPTER_UNLOADS.inc()
                self.cache.remove(entry)
                metrics.MERGED_EVICTIONS.inc()
            metrics.MERGED_CACHE_BYTES.set(self.cache.total_bytes())
        return len(victims)

    async def unload_using(self, name: str) -> None:
        """Unload every model vLLM holds that is served from ``name``: the adapter itself and
        the inline merges that include it (under the caller's lock)."""
        # The name itself even if not loaded yet: unload waits for a resolve of it in flight.
        for loaded in {name, *self.engine.loaded_names()}:
            if served_from(loaded, name) and await self.engine.unload(loaded):
                metrics.ADAPTER_UNLOADS.inc()

    def drop_built_from(self, name: str) -> None:
        """The cached merges of a deleted or replaced adapter go (unloaded first by
        :meth:`unload_using`)."""
        for entry in self.cache.built_from(name):
            self._names.pop(entry.key, None)
            self.cache.remove(entry)
