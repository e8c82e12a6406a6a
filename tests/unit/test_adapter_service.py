"""AdapterService without a server: a real store in a temporary folder, a fake engine.

Registration is all or nothing (every refusal leaves the store as it was), two registrations of
one name give one adapter, and a delete waits for the requests admitted before it
(:class:`ForwardTable`, as the plugin wires it) before its files go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_validation import BASE
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from vllm_lora_ext.adapters.store import AdapterStore
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.adapters.service import VERSIONS_DIR, AdapterService
from vllm_lora_ext.server.migrations.forwarding import ForwardTable

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a scenario in a fresh event loop; a hang fails the test instead of blocking it."""
    return asyncio.run(asyncio.wait_for(coro, 60))


class FakeEngine:
    """vLLM's side: what it holds by name; ``settle`` waits for the requests admitted so far
    through a :class:`ForwardTable`, as ``VllmEngineAdapters`` does; ``fail_load`` makes every
    load raise."""

    def __init__(self, table: ForwardTable | None = None) -> None:
        self.table = table or ForwardTable()
        self.loaded: dict[str, Path] = {}
        self.calls: list[str] = []
        self.fail_load: str | None = None
        self.settling = asyncio.Event()

    async def load(self, name: str, path: Path) -> None:
        self.calls.append(f"load:{name}")
        if self.fail_load is not None:
            raise RuntimeError(self.fail_load)
        self.loaded[name] = path

    async def unload(self, name: str) -> bool:
        self.calls.append(f"unload:{name}")
        return self.loaded.pop(name, None) is not None

    async def settle(self, name: str) -> None:
        self.calls.append(f"settle:{name}")
        self.settling.set()
        assert await self.table.drain(name, timeout=30)

    def loaded_names(self) -> set[str]:
        return set(self.loaded)

    async def prefetch(self, name: str, path: Path) -> None:
        self.loaded[name] = path

    async def pin(self, name: str) -> None:
        pass

    async def cached_names(self) -> set[str]:
        return set(self.loaded)

    async def load_ahead_resolved(self, name: str) -> None:
        pass


def make_service(root: Path, engine: FakeEngine, **kw: Any) -> AdapterService:
    kw = {"max_rank": 16, "max_upload_bytes": 1 << 30} | kw
    return AdapterService(AdapterStore(root), BASE, engine=engine, **kw)


def adapter_dir(path: Path, seed: int = 0, rank: int = 8, **overrides: Any) -> Path:
    return write_adapter(
        path, random_lora_tensors(seed, rank=rank), base="tiny", rank=rank, **overrides
    )


def tree(root: Path) -> list[str]:
    """Every file and link under ``root`` (empty folders aside), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_register_stores_loads_and_links_a_version(tmp_path: Path) -> None:
    """A registered adapter is in the store with its lineage, loaded by vLLM from a link named
    after its weights' hash, and counted among the service's names."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        record = await service.register_from_path("a", adapter_dir(tmp_path / "src"), origin="up")
        assert (record.name, record.rank, record.source) == ("a", 8, "up")
        assert service.get("a") == record and [(r.name, on) for r, on in service.list()] == [
            ("a", True)
        ]
        link = engine.loaded["a"]
        assert link.parent.name == VERSIONS_DIR and link.name == f"a-{record.weights_sha256[:16]}"
        assert link.resolve() == (tmp_path / "store" / "a").resolve()
        assert service.names == {"a"} and service.loaded_sha == {"a": record.weights_sha256}

    run(scenario())


def test_two_registrations_of_one_name_give_one_adapter(tmp_path: Path) -> None:
    """Registered at once under one name: one succeeds, the other is refused 409
    ``duplicate_name``; the store holds the winner's weights, loaded once."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        one, two = adapter_dir(tmp_path / "one", seed=1), adapter_dir(tmp_path / "two", seed=2)
        results = await asyncio.gather(
            service.register_from_path("a", one),
            service.register_from_path("a", two),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1
        assert isinstance(lost[0], Refused)
        assert (lost[0].reason, lost[0].status) == ("duplicate_name", 409)
        assert service.get("a").weights_sha256 == won[0].weights_sha256
        assert engine.calls == ["load:a"]
        assert [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".st")] == []

    run(scenario())


def _no_dir(tmp: Path) -> Path:
    return tmp / "missing"


def _pickle(tmp: Path) -> Path:
    src = adapter_dir(tmp / "src")
    (src / "adapter_model.bin").write_bytes(b"\x80\x04")
    return src


def _no_config(tmp: Path) -> Path:
    src = adapter_dir(tmp / "src")
    (src / CONFIG_FILE).unlink()
    return src


def _no_weights(tmp: Path) -> Path:
    src = adapter_dir(tmp / "src")
    (src / WEIGHTS_FILE).unlink()
    return src


def _stray_file(tmp: Path) -> Path:
    src = adapter_dir(tmp / "src")
    (src / "notes.txt").write_text("hello")
    return src


def _rank_32(tmp: Path) -> Path:
    return adapter_dir(tmp / "src", rank=32)


def _other_base(tmp: Path) -> Path:
    return write_adapter(tmp / "src", random_lora_tensors(0), base="someone/else")


def _dora(tmp: Path) -> Path:
    return adapter_dir(tmp / "src", use_dora=True)


def _good(tmp: Path) -> Path:
    return adapter_dir(tmp / "src")


REFUSALS: list[tuple[str, str, Callable[[Path], Path], dict[str, Any], str, int]] = [
    ("path name", "../a", _good, {}, "invalid_name", 400),
    ("empty name", "", _good, {}, "invalid_name", 400),
    ("base name", "tiny", _good, {}, "invalid_name", 400),
    ("base alias", "tiny-llama", _good, {}, "invalid_name", 400),
    ("not a directory", "a", _no_dir, {}, "missing_file", 400),
    ("pickle", "a", _pickle, {}, "pickle_file", 400),
    ("no config", "a", _no_config, {}, "missing_file", 400),
    ("no weights", "a", _no_weights, {}, "missing_file", 400),
    ("stray file", "a", _stray_file, {}, "unexpected_file", 400),
    ("rank", "a", _rank_32, {}, "rank_too_high", 400),
    ("other base", "a", _other_base, {}, "wrong_base", 400),
    ("dora", "a", _dora, {}, "malformed_config", 400),
    ("too large", "a", _good, {"max_upload_bytes": 1000}, "too_large", 413),
]


@pytest.mark.parametrize(
    ("name", "make", "kw", "reason", "status"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_refused_registrations_leave_the_store_unchanged(
    tmp_path: Path,
    name: str,
    make: Callable[[Path], Path],
    kw: dict[str, Any],
    reason: str,
    status: int,
) -> None:
    """Each bad registration is refused with its reason and status; the store holds what it
    held before (no adapter, no staging leftovers) and vLLM was never asked to load it."""

    async def scenario() -> None:
        setup = make_service(tmp_path / "store", FakeEngine())
        await setup.register_from_path("keep", adapter_dir(tmp_path / "keep", seed=5))
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine, **kw)
        before = tree(tmp_path / "store")
        source = make(tmp_path)
        with pytest.raises(Refused) as e:
            await service.register_from_path(name, source)
        assert (e.value.reason, e.value.status) == (reason, status), e.value.message
        assert tree(tmp_path / "store") == before
        assert [a.name for a in service.store.list()] == ["keep"]
        assert engine.calls == [] and service.names == {"keep"}

    run(scenario())


def test_an_adapter_vllm_rejects_is_removed_again(tmp_path: Path) -> None:
    """vLLM failing to load it: 422 ``engine_rejected``, and the adapter and its version link
    are gone from the store, so the name is free again."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        engine.fail_load = "no slot"
        with pytest.raises(Refused) as e:
            await service.register_from_path("a", adapter_dir(tmp_path / "src"))
        assert (e.value.reason, e.value.status) == ("engine_rejected", 422)
        assert "no slot" in e.value.message
        assert tree(tmp_path / "store") == [] and service.get("a") is None
        engine.fail_load = None
        await service.register_from_path("a", adapter_dir(tmp_path / "src"))
        assert service.get("a") is not None

    run(scenario())


def test_a_client_path_must_lie_under_the_allowed_roots(tmp_path: Path) -> None:
    """``register_client_path``: off without roots (403), refused outside them, and a link
    inside an allowed folder that points outside is refused too; the store stays empty."""

    async def scenario() -> None:
        outside = adapter_dir(tmp_path / "outside")
        allowed = tmp_path / "allowed"
        closed = make_service(tmp_path / "store", FakeEngine())
        with pytest.raises(Refused) as e:
            await closed.register_client_path("a", outside)
        assert (e.value.reason, e.value.status) == ("path_not_allowed", 403)
        service = make_service(tmp_path / "store", FakeEngine(), allowed_paths=[allowed])
        with pytest.raises(Refused) as e:
            await service.register_client_path("a", outside)
        assert (e.value.reason, e.value.status) == ("path_not_allowed", 403)
        sneaky = allowed / "sneaky"
        sneaky.mkdir(parents=True)
        (sneaky / CONFIG_FILE).write_text((outside / CONFIG_FILE).read_text())
        (sneaky / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
        with pytest.raises(Refused) as e:
            await service.register_client_path("a", sneaky)
        assert (e.value.reason, e.value.status) == ("path_not_allowed", 403)
        assert tree(tmp_path / "store") == []
        inside = adapter_dir(allowed / "good")
        record = await service.register_client_path("a", inside)
        assert record.source == str(inside)

    run(scenario())


def test_a_delete_waits_for_the_requests_admitted_before_it(tmp_path: Path) -> None:
    """A request admitted for ``a`` before the delete is still served: until it ends, ``a``
    stays in the store and loaded; then it is unloaded and its files and link go."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        await service.register_from_path("a", adapter_dir(tmp_path / "src"))
        ticket = engine.table.admit("a")
        removal = asyncio.create_task(service.remove("a"))
        await engine.settling.wait()
        assert not removal.done()
        assert service.store.get("a") is not None and "a" in engine.loaded
        assert engine.calls == ["load:a", "settle:a"]
        engine.table.release("a", ticket)
        assert await removal is True
        assert engine.calls == ["load:a", "settle:a", "unload:a"]
        assert service.get("a") is None and service.store.get("a") is None
        assert tree(tmp_path / "store") == [] and service.names == set()

    run(scenario())


def test_a_delete_racing_a_registration_removes_it_whole(tmp_path: Path) -> None:
    """A delete issued while the same name registers waits for the registration, then removes
    it entirely: nothing left in the store, in vLLM or in the version links."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        record, removed = await asyncio.gather(
            service.register_from_path("a", adapter_dir(tmp_path / "src")), service.remove("a")
        )
        assert record.name == "a" and removed is True
        assert engine.calls == ["load:a", "settle:a", "unload:a"]
        assert engine.loaded == {} and tree(tmp_path / "store") == []
        assert service.names == set() and service.loaded_sha == {}

    run(scenario())


def test_a_delete_unloads_inline_merges_built_from_it(tmp_path: Path) -> None:
    """Deleting ``a`` unloads ``a`` and every loaded inline merge that uses it, not the others,
    and tells the listeners (one that raises does not stop the delete)."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        for i, name in enumerate(("a", "b")):
            await service.register_from_path(name, adapter_dir(tmp_path / name, seed=i))
        engine.loaded["merge:a=0.5,b=0.5"] = tmp_path
        engine.loaded["merge:b=1"] = tmp_path
        heard: list[str] = []

        def broken(name: str) -> None:
            raise RuntimeError("listener bug")

        service.on_remove += [broken, heard.append]
        assert await service.remove("a") is True
        assert set(engine.loaded) == {"b", "merge:b=1"}
        assert heard == ["a"]
        assert await service.remove("a") is False
        assert heard == ["a"]

    run(scenario())


def test_sync_with_store_follows_another_replicas_delete(tmp_path: Path) -> None:
    """An adapter another replica deleted from the shared store is unloaded here at its next
    request; one still in the store with the same weights is left alone."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        for i, name in enumerate(("a", "b")):
            await service.register_from_path(name, adapter_dir(tmp_path / name, seed=i))
        service.store.remove("a")  # the other replica
        await service.sync_with_store("a")
        await service.sync_with_store("b")
        assert set(engine.loaded) == {"b"} and service.names == {"b"}
        assert "unload:b" not in engine.calls

    run(scenario())


def test_sync_with_store_follows_another_replicas_replacement(tmp_path: Path) -> None:
    """Re-registered elsewhere with other weights: the old weights are unloaded here (the next
    request loads the new ones) and what was derived from the old ones is dropped."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        await service.register_from_path("a", adapter_dir(tmp_path / "old", seed=1))
        other = make_service(tmp_path / "store", FakeEngine())  # a replica on the same store
        other.store.remove("a")
        await other.register_from_path("a", adapter_dir(tmp_path / "new", seed=2))
        heard: list[str] = []
        service.on_remove.append(heard.append)
        await service.sync_with_store("a")
        assert "a" not in engine.loaded and heard == ["a"]
        assert service.get("a").weights_sha256 == other.get("a").weights_sha256

    run(scenario())


async def _files(items: list[tuple[str, bytes]]) -> AsyncIterator[tuple[str, Iterable[bytes]]]:
    for name, data in items:
        yield name, [data]


def test_an_upload_naming_a_file_twice_is_refused(tmp_path: Path) -> None:
    """``register`` (the multipart upload path) refuses a file given twice; nothing stays."""

    async def scenario() -> None:
        engine = FakeEngine()
        service = make_service(tmp_path / "store", engine)
        src = adapter_dir(tmp_path / "src")
        config = (src / CONFIG_FILE).read_bytes()
        files = [(CONFIG_FILE, config), (CONFIG_FILE, config)]
        with pytest.raises(Refused) as e:
            await service.register("a", _files(files), source="upload")
        assert e.value.reason == "unexpected_file"
        assert tree(tmp_path / "store") == [] and engine.calls == []

    run(scenario())
