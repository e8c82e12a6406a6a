"""Register, list and remove adapters: the store and the engine kept in step.

Inline merges (``merge:a=0.7,b=0.3``) are :class:`InlineMerges`' (``self.merges``): the service
only tells it when an adapter goes.

The engine side is reached through :class:`EngineAdapters`, implemented in
``vllm_boundary/api/engine.py`` (vLLM's side), so this module is testable without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.store import AdapterStore, StoredAdapter
from vllm_lora_ext.adapters.validation import (
    Refused,
    check_allowed_path,
    check_file_name,
    check_file_names,
    validate_name,
)
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.inline_merges import InlineMerges

VERSIONS_DIR = ".versions"
logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines


class EngineAdapters(Protocol):
    """The few engine operations registration needs."""

    async def load(self, name: str, path: Path) -> None: ...  # raises on failure
    async def unload(self, name: str) -> bool: ...
    async def settle(self, name: str) -> None: ...  # until the requests admitted so far end
    def loaded_names(self) -> set[str]: ...
    async def prefetch(self, name: str, path: Path) -> None: ...  # into the CPU cache now
    async def pin(self, name: str) -> None: ...  # never evicted from the CPU cache
    async def cached_names(self) -> set[str]: ...
    async def load_ahead_resolved(self, name: str) -> None: ...  # into memory, off the step


class AdapterService:
    def __init__(
        self,
        store: AdapterStore,
        base: BaseModelInfo,
        max_rank: int,
        engine: EngineAdapters,
        max_upload_bytes: int,
        max_pinned: int = 0,
        inline_merges: bool = True,
        merged_cache_bytes: int = 1 << 30,
        allowed_paths: Sequence[Path] = (),
    ) -> None:
        self.store = store
        self.base = base
        self.max_rank = max_rank
        self.engine = engine
        self.max_upload_bytes = max_upload_bytes
        self.max_pinned = max_pinned
        self.pinned: set[str] = set()
        self.loaded_sha: dict[str, str] = {}
        """Weights hash of what vLLM holds under each name (to see a replaced adapter)."""
        self._lock = asyncio.Lock()
        self._removing: set[str] = set()
        """Names being deleted: hidden from the resolver while vLLM lets go of them."""
        self.names = {a.name for a in self._adapters_of_base()}
        metrics.ADAPTERS_REGISTERED.set(len(self.names))
        self.merges = InlineMerges(
            store, base, max_rank, engine, self.get, self._lock, inline_merges,
            merged_cache_bytes,
        )  # fmt: skip
        self.allowed_paths = [Path(p).resolve() for p in allowed_paths]
        self.on_remove: list[Callable[[str], None]] = []
        """Called with the name of a deleted or replaced adapter: what was derived from it
        (statistics, prompt reservoirs) goes with it."""

    def _adapters_of_base(self) -> list[StoredAdapter]:
        return [a for a in self.store.list() if a.base == self.base.name]

    def list(self) -> list[tuple[StoredAdapter, bool]]:
        loaded = self.engine.loaded_names()
        return [(a, a.name in loaded) for a in self._adapters_of_base()]

    def get(self, name: str) -> StoredAdapter | None:
        validate_name(name)
        if name in self._removing:
            return None
        record = self.store.get(name)
        return record if record is not None and record.base == self.base.name else None

    async def register_client_path(self, name: str, source: Path) -> StoredAdapter:
        """``POST /v1/adapters {"path"}``: only from under the configured roots
        (``allowed_paths``, checked after resolving symlinks, each file too)."""
        validate_name(name, reserved=self.base.aliases)
        resolved = check_allowed_path(source, self.allowed_paths)
        return await self.register_from_path(name, resolved, origin=str(source), confined=True)

    async def register_from_path(
        self, name: str, source: Path, origin: str | None = None, confined: bool = False
    ) -> StoredAdapter:
        """Copy a PEFT directory from the server's disk into the store, then load it
        (``confined``: every file must resolve under ``allowed_paths``)."""
        validate_name(name, reserved=self.base.aliases)
        if not source.is_dir():
            raise Refused("missing_file", f"{str(source)!r} is not a directory")
        check_file_names(p.name for p in source.iterdir())

        async def files() -> AsyncIterator[tuple[str, Iterable[bytes]]]:
            for p in source.iterdir():
                # A link inside an allowed folder may point anywhere.
                real = check_allowed_path(p, self.allowed_paths, "file") if confined else p
                yield p.name, _chunks(real)

        return await self.register(name, files(), source=origin or str(source))

    async def register(
        self, name: str, files: AsyncIterator[tuple[str, Iterable[bytes]]], source: str
    ) -> StoredAdapter:
        """Stage ``files``, validate, move into the store, load into vLLM; all or nothing."""
        validate_name(name, reserved=self.base.aliases)
        async with self._lock:
            if self.store.get(name) is not None:
                raise Refused("duplicate_name", f"adapter {name!r} already exists", 409)
            with self.store.staging() as staged:
                await self._write_files(staged, files)
                commit = asyncio.ensure_future(
                    asyncio.to_thread(
                        self.store.commit, staged, name, self.base, self.max_rank, source
                    )
                )
                try:
                    record = await asyncio.shield(commit)
                except asyncio.CancelledError:  # the thread still commits: undo it after
                    with contextlib.suppress(Exception):
                        self._undo_registration(await commit, loading=False)
                    raise
            try:
                await self.engine.load(name, self.serving_path(record))
            except BaseException as e:  # a cancel too: all or nothing
                cancelled = not isinstance(e, Exception)
                self._undo_registration(record, loading=cancelled)
                if cancelled:
                    raise
                raise Refused(
                    "engine_rejected", f"vLLM could not load the adapter: {e}", 422
                ) from e
        metrics.ADAPTER_LOADS.inc()
        self.note_loaded(record)
        return record

    def _undo_registration(self, record: StoredAdapter, loading: bool) -> None:
        """Remove a registration that did not complete; if vLLM may have loaded it meanwhile
        (a cancel during the load), unload it too, in the background."""
        self.serving_path(record).unlink(missing_ok=True)
        self.store.remove(record.name)
        if loading:
            unload = asyncio.ensure_future(self.engine.unload(record.name))
            unload.add_done_callback(lambda t: t.cancelled() or t.exception())

    def serving_path(self, record: StoredAdapter) -> Path:
        """Where vLLM loads ``record`` from: a link named after its weights' hash.

        vLLM keys its prefix cache by adapter name and path. A name deleted and registered
        again with other weights keeps its store path, so KV blocks computed with the old
        weights would be served for the new ones; a path per weights version prevents it.
        """
        link = self.store.root / VERSIONS_DIR / f"{record.name}-{record.weights_sha256[:16]}"
        if not link.is_symlink():
            link.parent.mkdir(exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another replica made it first
                os.symlink(Path("..") / record.name, link)
        return link

    def note_loaded(self, record: StoredAdapter) -> None:
        """vLLM now holds ``record``'s weights under its name (registered, loaded, resolved)."""
        self.loaded_sha[record.name] = record.weights_sha256
        if record.name not in self.names:
            self.names.add(record.name)
            metrics.ADAPTERS_REGISTERED.set(len(self.names))

    async def ensure_loaded(self, name: str) -> None:
        """Load a stored adapter into vLLM now (it is otherwise loaded on first request)."""
        if name in self.engine.loaded_names():
            return
        record = self.get(name)
        if record is None:
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
        try:
            await self.engine.load(name, self.serving_path(record))
        except Exception as e:
            raise Refused("engine_rejected", f"vLLM could not load the adapter: {e}", 422) from e
        metrics.ADAPTER_LOADS.inc()
        self.note_loaded(record)

    async def load_ahead(self, name: str) -> None:
        """Before a request for ``name`` reaches the scheduler: if vLLM's CPU cache lost the
        adapter, have it read back in the background now, so no engine step waits for the disk
        (a first request's adapter is loaded ahead by the store resolver). Never fails the
        request: a load that does not happen here happens in the step, as in vLLM."""
        if name not in self.names:
            return
        try:
            await self.engine.load_ahead_resolved(name)
        except Exception:
            logger.exception("vllm-lora-ext: loading %r ahead", name)

    async def prefetch(self, name: str) -> None:
        """Load a stored adapter into vLLM's CPU cache now, so its first request does not wait
        for the disk (a hint: the LRU may still evict it later, unless it is pinned)."""
        record = self.get(name)
        if record is None:
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
        newly = name not in self.engine.loaded_names()
        try:
            await self.engine.prefetch(name, self.serving_path(record))
        except Exception as e:
            raise Refused("engine_rejected", f"vLLM could not load the adapter: {e}", 422) from e
        if newly:
            metrics.ADAPTER_LOADS.inc()
            self.note_loaded(record)

    async def pin(self, name: str) -> None:
        """Load ``name`` and keep it in vLLM's CPU cache until it is deleted or the server stops.

        At most ``max_pinned`` (``--max-cpu-loras`` minus ``--max-loras``): a full batch of
        unpinned adapters must still fit in the cache beside the pinned ones.
        """
        if name in self.pinned:
            return
        if self.get(name) is None:
            raise Refused("unknown_adapter", f"adapter {name!r} not found", 404)
        if len(self.pinned) >= self.max_pinned:
            raise Refused(
                "too_many_pinned",
                f"{len(self.pinned)} adapters are pinned, the most this server allows "
                f"(--max-cpu-loras minus --max-loras = {self.max_pinned})",
                409,
            )
        await self.prefetch(name)
        try:
            await self.engine.pin(name)
        except Exception as e:
            raise Refused("engine_rejected", f"vLLM could not pin it: {e}", 422) from e
        self.pinned.add(name)

    async def pin_at_start(self, names: Iterable[str]) -> None:
        """The configured pins (``VLLM_LORA_EXT_PINNED_ADAPTERS``); one that fails is logged,
        not fatal: in a shared store another replica may have deleted it."""
        for name in names:
            try:
                await self.pin(name)
            except Refused as e:
                logger.error("vllm-lora-ext: cannot pin %r: %s", name, e.message)

    async def remove(self, name: str) -> bool:
        """Unload ``name`` (after the requests admitted for it), then delete its files.

        The requests admitted before the call are served first; then the resolver no longer
        finds it (later requests get 404); its files stay until vLLM has let go of it, since a
        running request may still load them.
        """
        validate_name(name)
        async with self._lock:
            record = self.get(name)
            if record is None:
                return False
            await self.engine.settle(name)
            self._removing.add(name)
            try:
                # Inline merges that include this adapter must not outlive it.
                await self.merges.unload_using(name)
                self.store.remove(name)
                self.serving_path(record).unlink(missing_ok=True)
                self._forget(name)
                self._drop_derived(name)
            finally:
                self._removing.discard(name)
            return True

    def _drop_derived(self, name: str) -> None:
        """A deleted or replaced adapter's inline merges, statistics and reservoir go too
        (the merges built from it are unloaded by the caller first)."""
        self.merges.drop_built_from(name)
        for listener in self.on_remove:
            try:
                listener(name)
            except Exception:
                logger.exception("vllm-lora-ext: cleaning up after %r", name)

    async def sync_with_store(self, name: str) -> None:
        """Follow what another replica did to a shared store, before a request for ``name``.

        vLLM keeps serving an adapter it holds whatever happens on disk. If another replica
        deleted it, unload it here too (the request then gets vLLM's 404); if it re-registered
        the name with other weights, unload the old ones (the request loads the new ones
        through the resolver; a pinned adapter is pinned again). One small file read.
        """
        held = self.loaded_sha.get(name)  # None: not loaded from the store (a merge, a temp)
        if held is None or name not in self.engine.loaded_names():
            return
        record = self.get(name)
        if record is not None and record.weights_sha256 == held:
            return
        async with self._lock:
            await self.merges.unload_using(name)
            was_pinned = name in self.pinned
            self._forget(name)
            self._drop_derived(name)
        logger.info(
            "vllm-lora-ext: %r was %s in the store by another server; unloaded here",
            name,
            "deleted" if record is None else "replaced",
        )
        if record is not None and was_pinned:
            await self.pin(name)

    def _forget(self, name: str) -> None:
        self.names.discard(name)
        self.pinned.discard(name)  # vLLM's cache drops the pin with the adapter
        self.loaded_sha.pop(name, None)
        metrics.ADAPTERS_REGISTERED.set(len(self.names))

    async def _write_files(
        self, staged: Path, files: AsyncIterator[tuple[str, Iterable[bytes]]]
    ) -> None:
        names: list[str] = []
        total = 0
        async for file_name, chunks in files:
            check_file_name(file_name)
            if file_name in names:
                raise Refused("unexpected_file", f"{file_name!r} given twice")
            names.append(file_name)
            with (staged / file_name).open("wb") as out:
                for chunk in chunks:
                    total += len(chunk)
                    if total > self.max_upload_bytes:
                        raise Refused(
                            "too_large",
                            f"adapter exceeds the {self.max_upload_bytes}-byte limit",
                            413,
                        )
                    out.write(chunk)
        check_file_names(names)


def _chunks(path: Path, size: int = 1 << 20) -> Iterable[bytes]:
    with path.open("rb") as f:
        yield from iter(lambda: f.read(size), b"")
