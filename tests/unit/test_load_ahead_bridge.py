"""The API side of loads ahead (``vllm_boundary.api.engine.VllmEngineAdapters``), against a
fake engine client: what it asks the worker, when it waits, and when it asks nothing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from vllm_lora_ext.vllm_boundary.api.engine import VllmEngineAdapters


class FakeWorker:
    """``collective_rpc`` of a worker whose background load finishes after ``steps`` polls."""

    def __init__(self, steps: int = 3, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.steps = steps
        self.fail = fail
        self.errored = False
        self.cached_ids: list[int] = []

    async def collective_rpc(self, method: str, args: tuple = ()):
        self.calls.append((method, *args))
        if self.fail:
            raise RuntimeError("no such method on the worker")
        if method == "lora_ext_load_ahead":
            return ["loading"]
        if method == "lora_ext_load_state":
            self.steps -= 1
            return ["loading" if self.steps > 0 else "ready"]
        if method == "lora_ext_residency":
            return [{"slots": self.cached_ids[:1], "cached": self.cached_ids, "loads": {}}]
        raise AssertionError(method)


def bridge(worker: FakeWorker, requests: dict | None = None) -> VllmEngineAdapters:
    models = SimpleNamespace(lora_requests=requests or {})
    return VllmEngineAdapters(models, worker, drain=None)


def request(name: str, lora_id: int, path: str):
    return SimpleNamespace(lora_name=name, lora_int_id=lora_id, lora_path=path)


def test_a_load_ahead_waits_until_the_worker_has_it_then_is_not_asked_again():
    worker = FakeWorker(steps=3)
    engine = bridge(worker)
    asyncio.run(engine.load_ahead("a", "/store/a"))
    assert [c[0] for c in worker.calls] == ["lora_ext_load_ahead"] + ["lora_ext_load_state"] * 3
    asyncio.run(engine.load_ahead("a", "/store/a"))
    assert len(worker.calls) == 4  # resident now: no call


def test_the_residency_report_decides_what_is_resident_and_names_the_ids():
    worker = FakeWorker(steps=1)
    engine = bridge(worker, {"a": request("a", 1, "/a"), "b": request("b", 2, "/b")})
    asyncio.run(engine.load_ahead("a", "/a"))
    worker.cached_ids = [2]  # the LRU evicted a, b came in
    report = asyncio.run(engine.residency())
    assert report["slots"] == ["b"] and report["cached"] == ["b"]
    assert engine.resident_paths == {"/b"}
    worker.calls.clear()
    asyncio.run(engine.load_ahead_resolved("a"))  # evicted: asked again
    assert worker.calls[0] == ("lora_ext_load_ahead", "/a", "a")
    worker.calls.clear()
    asyncio.run(engine.load_ahead_resolved("b"))
    asyncio.run(engine.load_ahead_resolved("unresolved"))
    assert worker.calls == []


def test_a_worker_without_the_extension_turns_loads_ahead_off_without_failing():
    worker = FakeWorker(fail=True)
    engine = bridge(worker)
    asyncio.run(engine.load_ahead("a", "/a"))  # no exception: the step loads it, as in vLLM
    asyncio.run(engine.load_ahead("b", "/b"))
    assert len(worker.calls) == 1 and engine.ahead_enabled is False
