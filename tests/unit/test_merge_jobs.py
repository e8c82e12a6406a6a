"""Merge jobs without a server: the job book and its records, every refusal of ``submit`` and of
the families' checks, and the state machine of a job (succeeded, failed, cancelled,
interrupted), with a real store and :class:`AdapterService` over a fake engine."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from test_validation import BASE
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.lora_weights import LoraWeights, load_lora
from vllm_lora_ext.adapters.recipe import RECIPE_FILE
from vllm_lora_ext.adapters.store import AdapterStore
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server import job_records
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.job_records import JOBS_DIR, JobRecords
from vllm_lora_ext.server.jobs import Job, JobBook
from vllm_lora_ext.server.merges.families import FAMILIES
from vllm_lora_ext.server.merges.job import MergeContext, MergeJob, MergeRequest
from vllm_lora_ext.server.merges.jobs import MergeJobs
from vllm_lora_ext.stats.reservoir import Reservoir

T = TypeVar("T")
OTHER_BASE = BaseModelInfo(**(BASE.model_dump() | {"name": "other", "aliases": {"other"}}))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a scenario in a fresh event loop; a hang fails the test instead of blocking it."""
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- fakes ------------------------------------------------------------------------------------


class FakeEngine:
    """The engine side of :class:`AdapterService`: remembers what it holds; ``load_gate`` (if
    set) holds every load until it is set, after ``load_entered``."""

    def __init__(self) -> None:
        self.loaded: dict[str, Path] = {}
        self.calls: list[str] = []
        self.load_gate: asyncio.Event | None = None
        self.load_entered = asyncio.Event()

    async def load(self, name: str, path: Path) -> None:
        self.calls.append(f"load:{name}")
        self.load_entered.set()
        if self.load_gate is not None:
            await self.load_gate.wait()
        self.loaded[name] = path

    async def unload(self, name: str) -> bool:
        self.calls.append(f"unload:{name}")
        return self.loaded.pop(name, None) is not None

    async def settle(self, name: str) -> None:
        self.calls.append(f"settle:{name}")

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


@dataclass
class FakeStats:
    """What the merge families read from :class:`StatsService`."""

    capturing: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    reservoirs: dict[str, Reservoir] = field(default_factory=dict)

    def held_tokens(self, name: str) -> int:
        return self.tokens.get(name, 0)

    def held(self, name: str) -> None:
        return None


@dataclass
class FakeReplayer:
    url: str = "http://127.0.0.1:1"
    headers: dict[str, str] = field(default_factory=dict)
    model_dir: Path = Path("/nonexistent")


class BlockingFamily:
    """A merge family whose run waits for ``release``, then returns ``outcome`` or raises it."""

    methods = ("test_blocking",)

    def __init__(self, outcome: LoraWeights | BaseException) -> None:
        self.outcome = outcome
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def check(self, ctx: MergeContext, request: MergeRequest) -> dict[str, Any]:
        return {}

    async def run(
        self, ctx: MergeContext, job: MergeJob, work: Path
    ) -> tuple[LoraWeights, dict[str, Any]]:
        job.phase = "blocked"
        self.entered.set()
        await self.release.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome, {}


# -- helpers ----------------------------------------------------------------------------------


def add_adapter(
    store: AdapterStore, name: str, seed: int, rank: int = 8, base: BaseModelInfo = BASE
) -> None:
    with store.staging() as staged:
        write_adapter(staged, random_lora_tensors(seed, rank=rank), base=base.name, rank=rank)
        store.commit(staged, name, base, max_rank=64, source="test")


def reservoir(texts: int) -> Reservoir:
    r = Reservoir(capacity=64)
    for i in range(texts):
        r.offer({"prompt": f"question {i}"})
    return r


@dataclass
class Env:
    store: AdapterStore
    engine: FakeEngine
    service: AdapterService
    stats: FakeStats
    merges: MergeJobs


def make_env(
    root: Path,
    max_rank: int = 16,
    stopping: Callable[[], bool] = lambda: False,
    records_dir: Path | None = None,
) -> Env:
    """A store with ``a`` and ``b`` (rank 8) of the served base and ``x`` of another, a
    service over a fake engine, and merge jobs."""
    store = AdapterStore(root)
    if store.get("a") is None:
        add_adapter(store, "a", seed=1)
        add_adapter(store, "b", seed=2)
        add_adapter(store, "x", seed=3, base=OTHER_BASE)
    engine = FakeEngine()
    service = AdapterService(store, BASE, max_rank, engine, max_upload_bytes=1 << 30)
    stats = FakeStats(
        tokens={"a": 1000, "b": 1000}, reservoirs={"a": reservoir(8), "b": reservoir(8)}
    )
    merges = MergeJobs(
        service, stats, FakeReplayer(), records_dir=records_dir, server_stopping=stopping
    )
    return Env(store, engine, service, stats, merges)


def request(name: str = "m", method: str = "cat", adapters: Any = None, **params: Any):
    terms = [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 2.0}]
    return MergeRequest.model_validate(
        {"name": name, "method": method, "adapters": terms if adapters is None else adapters}
        | {"params": params}
    )


def tiny_merge() -> LoraWeights:
    return LoraWeights(random_lora_tensors(7, rank=4), rank=4, lora_alpha=4.0)


def work_dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith((".merge-", ".staging-"))]


@pytest.fixture(autouse=True)
def _restore_threads():
    """MergeJobs sets torch to one thread for the process; put it back after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- JobBook and job records --------------------------------------------------------------------


@dataclass
class ToyJob(Job):
    state: str = "running"
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "error": self.error}


def test_job_book_records_the_start_and_each_milestone(tmp_path: Path) -> None:
    """``start`` writes the record before the task runs; ``save`` rewrites it; both are found
    by id, and the task is the job's."""

    async def scenario() -> None:
        book: JobBook[ToyJob] = JobBook(tmp_path, frozenset({"running"}))
        ran = asyncio.Event()

        async def work() -> None:
            ran.set()

        job = book.start(ToyJob("j1"), work())
        assert json.loads((tmp_path / "j1.json").read_text())["state"] == "running"
        await job.task
        assert ran.is_set()
        job.state = "done"
        job.finish()
        book.save(job)
        assert json.loads((tmp_path / "j1.json").read_text())["state"] == "done"
        assert book.get("j1") is job and book.get("nope") is None
        assert book.view("j1") == {"id": "j1", "state": "done", "error": None}
        assert book.view("nope") is None

    run(scenario())


def test_restart_reads_running_records_as_interrupted(tmp_path: Path) -> None:
    """A job running when the server stopped reads ``interrupted`` (its running parts too), on
    disk as well; finished jobs are kept as they were."""
    running = {
        "id": "r",
        "state": "running",
        "error": None,
        "adapters": [{"name": "a", "state": "running"}, {"name": "b", "state": "switched"}],
    }
    (tmp_path / "r.json").write_text(json.dumps(running))
    (tmp_path / "d.json").write_text(json.dumps({"id": "d", "state": "done", "error": "x"}))
    restored = JobRecords(tmp_path, frozenset({"running"})).restored
    assert restored["r"]["state"] == "interrupted"
    assert restored["r"]["error"] == "the server stopped while the job ran"
    assert [a["state"] for a in restored["r"]["adapters"]] == ["interrupted", "switched"]
    assert restored["d"] == {"id": "d", "state": "done", "error": "x"}
    assert json.loads((tmp_path / "r.json").read_text())["state"] == "interrupted"


def test_unreadable_and_anonymous_records_are_skipped(tmp_path: Path) -> None:
    """A torn file or a record without an id does not stop the others from loading."""
    (tmp_path / "torn.json").write_text('{"id": "t", "sta')
    (tmp_path / "anon.json").write_text(json.dumps({"state": "done"}))
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "ok.json").write_text(json.dumps({"id": "ok", "state": "done"}))
    assert list(JobRecords(tmp_path, frozenset({"running"})).restored) == ["ok"]


def test_records_beyond_the_limit_go_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving past ``MAX_RECORDS`` deletes the oldest records, from disk and from the list."""
    monkeypatch.setattr(job_records, "MAX_RECORDS", 3)
    now = time.time()
    for age, job_id in enumerate(["new", "mid", "old"]):
        path = tmp_path / f"{job_id}.json"
        path.write_text(json.dumps({"id": job_id, "state": "done"}))
        os.utime(path, (now - 100 * (age + 1), now - 100 * (age + 1)))
    records = JobRecords(tmp_path, frozenset({"running"}))
    assert set(records.restored) == {"new", "mid", "old"}
    records.save("fresh", {"id": "fresh", "state": "running"})
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["fresh", "mid", "new"]
    assert set(records.restored) == {"new", "mid"}


def test_views_list_earlier_runs_then_this_one_and_live_jobs_win(tmp_path: Path) -> None:
    """A live job shadows a record with its id; the others follow the restored records."""
    (tmp_path / "old.json").write_text(json.dumps({"id": "old", "state": "done"}))
    (tmp_path / "j1.json").write_text(json.dumps({"id": "j1", "state": "done"}))
    book: JobBook[ToyJob] = JobBook(tmp_path, frozenset({"running"}))
    book.jobs["j1"] = ToyJob("j1", state="running")
    book.jobs["j2"] = ToyJob("j2", state="running")
    assert [(v["id"], v["state"]) for v in book.views()] == [
        ("old", "done"),
        ("j1", "running"),
        ("j2", "running"),
    ]
    assert book.view("j1")["state"] == "running"
    assert book.view("old")["state"] == "done"


# -- the request ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"name": "m", "method": "cat", "adapters": []},
        {"name": "m", "method": "cat", "adapters": "some"},
        {
            "name": "m",
            "method": "ties",
            "adapters": [{"name": "a"}],
            "params": {"x": [float("nan")]},
        },
        {"name": "m", "method": "cat", "adapters": [{"name": "a", "weight": float("inf")}]},
        {"name": "m", "method": "cat", "adapters": [{"name": "a", "extra": 1}]},
        {"name": "m", "method": "cat", "adapters": [{"name": "a"}], "surprise": True},
    ],
)
def test_merge_request_refuses_malformed_bodies(body: dict[str, Any]) -> None:
    """No adapters, a string other than "all", NaN / infinity, unknown fields: a 422 before
    any job exists."""
    with pytest.raises(ValueError):
        MergeRequest.model_validate(body)


def test_merge_job_view_names_the_request() -> None:
    job = MergeJob("id1", request(), iterations=3)
    view = job.view()
    assert (view["id"], view["name"], view["method"], view["state"]) == (
        "id1",
        "m",
        "cat",
        "running",
    )
    assert view["iterations"] == 3 and view["finished_at"] is None


# -- refusals of submit and of the families' checks ---------------------------------------------


def _capturing(s: FakeStats) -> None:
    s.capturing["a"] = 1


def _few_tokens(s: FakeStats) -> None:
    s.tokens["b"] = 10


def _no_reservoir(s: FakeStats) -> None:
    del s.reservoirs["b"]


def _empty_reservoir(s: FakeStats) -> None:
    s.reservoirs["b"] = reservoir(0)


def _token_prompts(s: FakeStats) -> None:
    s.reservoirs["a"] = Reservoir(64)
    for i in range(10):
        s.reservoirs["a"].offer({"prompt": [1, 2, i]})  # token ids: not text


EXAMPLES = [{"input": f"q{i}", "output": f"a{i}"} for i in range(8)]
TWO = [{"name": "a"}, {"name": "b"}]

REFUSALS: list[tuple[str, dict[str, Any], Callable[[FakeStats], None] | None, str, int]] = [
    ("path name", {"name": "../m"}, None, "invalid_name", 400),
    ("space in name", {"name": "m m"}, None, "invalid_name", 400),
    ("base name", {"name": "tiny"}, None, "invalid_name", 400),
    ("base alias", {"name": "tiny-llama"}, None, "invalid_name", 400),
    ("existing adapter", {"name": "a"}, None, "duplicate_name", 409),
    ("unknown method", {"method": "average"}, None, "invalid_merge", 400),
    ("all, classic", {"method": "linear", "adapters": "all"}, None, "invalid_merge", 400),
    ("named twice", {"adapters": [{"name": "a"}, {"name": "a"}]}, None, "invalid_merge", 400),
    (
        "unknown adapter",
        {"adapters": [{"name": "a"}, {"name": "zz"}]},
        None,
        "unknown_adapter",
        404,
    ),
    ("invalid adapter name", {"adapters": [{"name": "../a"}]}, None, "invalid_name", 400),
    ("extra param", {"method": "linear", "params": {"density": 0.5}}, None, "invalid_merge", 400),
    ("missing param", {"method": "ties"}, None, "invalid_merge", 400),
    ("param range", {"method": "ties", "params": {"density": 2.0}}, None, "invalid_merge", 400),
    ("iteris all", {"method": "iteris", "adapters": "all"}, None, "invalid_merge", 400),
    (
        "iteris params",
        {"method": "iteris", "params": {"iterations": 0}},
        None,
        "invalid_merge",
        400,
    ),
    ("iteris capturing", {"method": "iteris"}, _capturing, "capturing", 409),
    ("iteris tokens", {"method": "iteris"}, _few_tokens, "invalid_merge", 409),
    (
        "iteris no reservoir",
        {"method": "iteris", "params": {"iterations": 2}},
        _no_reservoir,
        "invalid_merge",
        409,
    ),
    (
        "iteris empty reservoir",
        {"method": "iteris", "params": {"iterations": 2}},
        _empty_reservoir,
        "invalid_merge",
        409,
    ),
    ("pool no target", {"method": "adaptive"}, None, "invalid_merge", 400),
    (
        "pool two targets",
        {"method": "lorahub", "params": {"examples": EXAMPLES, "from_reservoir": "a"}},
        None,
        "invalid_merge",
        400,
    ),
    (
        "pool few examples",
        {"method": "adaptive", "params": {"examples": EXAMPLES[:7], "k": 1}},
        None,
        "invalid_merge",
        400,
    ),
    (
        "pool k too big",
        {"method": "adaptive", "adapters": "all", "params": {"examples": EXAMPLES, "k": 3}},
        None,
        "invalid_merge",
        400,
    ),
    (
        "pool named twice",
        {"method": "adaptive", "adapters": [{"name": "a"}] * 2, "params": {"examples": EXAMPLES}},
        None,
        "invalid_merge",
        400,
    ),
    (
        "pool unknown adapter",
        {"method": "lorahub", "adapters": [{"name": "zz"}], "params": {"examples": EXAMPLES}},
        None,
        "unknown_adapter",
        404,
    ),
    (
        "pool other base",
        {"method": "lorahub", "adapters": [{"name": "x"}], "params": {"examples": EXAMPLES}},
        None,
        "wrong_base",
        400,
    ),
    (
        "pool rank sum",
        {"method": "adaptive", "adapters": TWO, "params": {"examples": EXAMPLES, "k": 2}},
        None,
        "rank_too_high",
        400,
    ),
    (
        "pool unknown reservoir",
        {"method": "adaptive", "params": {"from_reservoir": "zz", "k": 1}},
        None,
        "unknown_adapter",
        404,
    ),
    (
        "pool small reservoir",
        {"method": "adaptive", "params": {"from_reservoir": "b", "k": 1}},
        _empty_reservoir,
        "invalid_merge",
        409,
    ),
    (
        "pool token reservoir",
        {"method": "adaptive", "params": {"from_reservoir": "a", "k": 1}},
        _token_prompts,
        "invalid_merge",
        409,
    ),
]


@pytest.mark.parametrize(
    ("overrides", "setup", "reason", "status"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_submit_refuses(
    tmp_path: Path,
    overrides: dict[str, Any],
    setup: Callable[[FakeStats], None] | None,
    reason: str,
    status: int,
) -> None:
    """Each request that cannot succeed is refused up front with its reason and status; no
    job is recorded, nothing is written to the store and nothing is loaded."""

    async def scenario() -> None:
        env = make_env(tmp_path, max_rank=8 if reason == "rank_too_high" else 16)
        if setup is not None:
            setup(env.stats)
        before = sorted(p.name for p in tmp_path.iterdir())
        body = {"name": "m", "method": "cat", "adapters": TWO, "params": {}} | overrides
        with pytest.raises(Refused) as e:
            await env.merges.submit(MergeRequest.model_validate(body))
        assert (e.value.reason, e.value.status) == (reason, status), e.value.message
        assert env.merges.book.jobs == {} and env.merges.views() == []
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != JOBS_DIR) == before
        assert env.engine.calls == []

    run(scenario())


def test_iteris_check_sets_the_iterations(tmp_path: Path) -> None:
    """An IterIS request that can run passes its check, which sets the job's iterations."""

    async def scenario() -> None:
        env = make_env(tmp_path)
        req = request(method="iteris", iterations=3)
        assert await FAMILIES["iteris"].check(env.merges.context, req) == {"iterations": 3}

    run(scenario())


def test_pool_of_all_is_this_bases_adapters(tmp_path: Path) -> None:
    """``"adapters": "all"`` means every adapter of the served base: not another base's."""

    async def scenario() -> None:
        env = make_env(tmp_path)
        assert env.store.get("x") is not None
        req = request(method="adaptive", adapters="all", examples=EXAMPLES, k=1)
        assert await FAMILIES["adaptive"].check(env.merges.context, req) == {"pool": ["a", "b"]}

    run(scenario())


def test_a_pending_jobs_name_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a job builds ``m``, another merge named ``m`` is refused 409; other names pass."""

    async def scenario() -> None:
        family = BlockingFamily(tiny_merge())
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        env = make_env(tmp_path)
        first = await env.merges.submit(request(method="test_blocking"))
        with pytest.raises(Refused) as e:
            await env.merges.submit(request(method="cat"))
        assert (e.value.reason, e.value.status) == ("duplicate_name", 409)
        other = await env.merges.submit(request(name="m2", method="cat"))
        await other.task
        assert other.state == "succeeded"
        family.release.set()
        await first.task
        assert first.state == "succeeded"

    run(scenario())


# -- the state machine ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_classic_merge_succeeds_and_registers_with_its_recipe(tmp_path: Path, method: str) -> None:
    """A classic merge ends ``succeeded``; the result is in the store (lineage says which job
    made it), loaded, with a recipe naming its sources by hash; no scratch is left."""

    async def scenario() -> None:
        env = make_env(tmp_path)
        job = await env.merges.submit(request(method=method))
        assert job.state == "running"
        await job.task
        assert (job.state, job.phase, job.error) == ("succeeded", "done", None), job.error
        assert job.finished_at is not None and job.finished_at >= job.created_at
        record = env.service.get("m")
        assert record is not None and record.source == f"merge:{job.id}"
        assert env.engine.calls == ["load:m"] and "m" in env.engine.loaded
        recipe = json.loads((env.store.path("m") / RECIPE_FILE).read_text())
        assert recipe["method"] == method and recipe["job"] == job.id
        assert recipe["base_model_name_or_path"] == BASE.name
        shas = {n: env.store.get(n).weights_sha256 for n in ("a", "b")}
        assert recipe["sources"] == [
            {"name": "a", "weight": 0.5, "sha256": shas["a"]},
            {"name": "b", "weight": 2.0, "sha256": shas["b"]},
        ]
        assert work_dirs(tmp_path) == []
        assert env.merges.view(job.id)["state"] == "succeeded"

    run(scenario())


def test_cat_merge_registers_the_exact_weighted_sum(tmp_path: Path) -> None:
    """What is registered for ``cat`` is 0.5 ΔW_a + 2 ΔW_b, module by module."""

    async def scenario() -> None:
        env = make_env(tmp_path)
        job = await env.merges.submit(request(method="cat"))
        await job.task
        assert job.state == "succeeded", job.error
        merged = load_lora(env.store.path("m"))
        a, b = load_lora(env.store.path("a")), load_lora(env.store.path("b"))
        assert merged.rank == 16 and merged.modules() == a.modules()
        for module in a.modules():
            expected = 0.5 * a.delta(module, torch.float64) + 2.0 * b.delta(module, torch.float64)
            torch.testing.assert_close(merged.delta(module, torch.float64), expected)

    run(scenario())


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("boom"), "RuntimeError: boom"),
        (Refused("invalid_merge", "the solver diverged"), "the solver diverged"),
    ],
)
def test_a_family_that_raises_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, message: str
) -> None:
    """The job ends ``failed`` with the error's message (a Refused's message as is); nothing is
    registered and the record says so."""

    async def scenario() -> None:
        family = BlockingFamily(error)
        family.release.set()
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        env = make_env(tmp_path)
        job = await env.merges.submit(request(method="test_blocking"))
        await job.task
        assert (job.state, job.error) == ("failed", message)
        assert env.service.get("m") is None and env.engine.calls == []
        assert work_dirs(tmp_path) == []
        saved = json.loads((tmp_path / JOBS_DIR / "merges" / f"{job.id}.json").read_text())
        assert (saved["state"], saved["error"]) == ("failed", message)

    run(scenario())


def test_a_merge_above_the_servers_rank_fails(tmp_path: Path) -> None:
    """``cat`` of two rank-8 adapters on a server whose max rank is 8: failed, not registered."""

    async def scenario() -> None:
        env = make_env(tmp_path, max_rank=8)
        job = await env.merges.submit(request(method="cat"))
        await job.task
        assert job.state == "failed"
        assert job.error.startswith("the merge has rank 16; the server's max is 8")
        assert env.service.get("m") is None and env.engine.calls == []

    run(scenario())


def test_a_name_taken_during_the_merge_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter registered under the job's name while it runs wins: the job fails with the
    store's refusal and the other adapter is untouched."""

    async def scenario() -> None:
        family = BlockingFamily(tiny_merge())
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        env = make_env(tmp_path)
        job = await env.merges.submit(request(method="test_blocking"))
        await family.entered.wait()
        upload = write_adapter(tmp_path / "upload", random_lora_tensors(9), base=BASE.name)
        await env.service.register_from_path("m", upload, origin="upload")
        family.release.set()
        await job.task
        assert job.state == "failed" and "already exists" in job.error
        assert env.service.get("m").source == "upload"
        assert work_dirs(tmp_path) == []

    run(scenario())


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_source_changed_during_the_merge_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """If a source adapter is deleted, or replaced by other weights, while the job runs, the
    job fails with that reason and registers nothing: its recipe would name the wrong hash."""

    async def scenario() -> None:
        family = BlockingFamily(tiny_merge())
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        env = make_env(tmp_path)
        job = await env.merges.submit(request(method="test_blocking"))
        await family.entered.wait()
        assert await env.service.remove("b")
        if change == "replaced":
            add_adapter(env.store, "b", seed=7)
        family.release.set()
        await job.task
        assert job.state == "failed" and "'b' was deleted or replaced" in job.error, job.error
        assert env.service.get("m") is None and "load:m" not in env.engine.calls

    run(scenario())


def test_cancel_ends_a_running_job_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cancel`` of a running job: ``cancelled``, nothing registered,
    the scratch folder removed, the record updated."""

    async def scenario() -> None:
        family = BlockingFamily(tiny_merge())
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        env = make_env(tmp_path)
        job = await env.merges.submit(request(method="test_blocking"))
        await family.entered.wait()
        assert work_dirs(tmp_path) != []
        assert env.merges.cancel(job.id) is job
        await job.task
        assert (job.state, job.phase, job.error) == ("cancelled", "cancelled", None)
        assert env.service.get("m") is None and env.engine.calls == []
        assert work_dirs(tmp_path) == []
        assert env.merges.view(job.id)["state"] == "cancelled"
        saved = json.loads((tmp_path / JOBS_DIR / "merges" / f"{job.id}.json").read_text())
        assert saved["state"] == "cancelled"

    run(scenario())


def test_cancel_of_an_unknown_or_finished_job_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        env = make_env(tmp_path)
        assert env.merges.cancel("nope") is None
        job = await env.merges.submit(request())
        await job.task
        assert env.merges.cancel(job.id) is job
        assert job.state == "succeeded"
        assert env.service.get("m") is not None

    run(scenario())


def test_cancel_during_registration_registers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module's promise, "cancelling or failing leaves nothing registered", also holds when
    the cancel arrives while vLLM loads the result."""

    async def scenario() -> None:
        env = make_env(tmp_path)
        env.engine.load_gate = asyncio.Event()
        job = await env.merges.submit(request(method="cat"))
        await env.engine.load_entered.wait()
        assert job.phase == "registering"
        env.merges.cancel(job.id)
        await job.task
        assert job.state == "cancelled"
        assert env.service.get("m") is None, "job says cancelled, yet 'm' is in the store"

    run(scenario())


@pytest.mark.parametrize("outcome", ["fail", "cancel", "succeed"])
def test_a_job_ending_while_the_server_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """Once the server is stopping, a job that fails or is cancelled reads ``interrupted``
    (with what happened); one that succeeded still reads ``succeeded``."""

    async def scenario() -> None:
        error = RuntimeError("engine gone")
        family = BlockingFamily(error if outcome == "fail" else tiny_merge())
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        stopping = False
        env = make_env(tmp_path, stopping=lambda: stopping)
        job = await env.merges.submit(request(method="test_blocking"))
        await family.entered.wait()
        stopping = True
        if outcome == "cancel":
            env.merges.cancel(job.id)
        else:
            family.release.set()
        await job.task
        expected = {
            "fail": (
                "interrupted",
                "the server stopped while the job ran (RuntimeError: engine gone)",
            ),
            "cancel": ("interrupted", "the server stopped while the job ran (cancelled)"),
            "succeed": ("succeeded", None),
        }[outcome]
        assert (job.state, job.error) == expected
        saved = json.loads((tmp_path / JOBS_DIR / "merges" / f"{job.id}.json").read_text())
        assert (saved["state"], saved["error"]) == expected

    run(scenario())


def test_a_new_merge_jobs_lists_the_finished_jobs(tmp_path: Path) -> None:
    """After a restart (a new MergeJobs on the same store), finished jobs are listed as they
    ended, by id, under ``<store>/.jobs/merges``."""

    async def scenario() -> None:
        env = make_env(tmp_path, max_rank=8)
        ok = await env.merges.submit(request(name="m1", method="linear"))
        bad = await env.merges.submit(request(name="m2", method="cat"))  # rank 16: fails
        await asyncio.gather(ok.task, bad.task)
        assert (ok.state, bad.state) == ("succeeded", "failed")
        assert (tmp_path / JOBS_DIR / "merges" / f"{ok.id}.json").is_file()
        again = make_env(tmp_path, max_rank=8)
        assert again.merges.book.jobs == {}
        views = {v["id"]: v for v in again.merges.views()}
        assert views == {ok.id: ok.view(), bad.id: bad.view()}
        assert again.merges.view(ok.id)["state"] == "succeeded"

    run(scenario())


def test_a_job_running_at_a_restart_reads_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job still running when the server stopped is listed ``interrupted`` by the next run."""

    async def scenario() -> None:
        family = BlockingFamily(tiny_merge())
        monkeypatch.setitem(FAMILIES, "test_blocking", family)
        records = tmp_path / "records"
        env = make_env(tmp_path / "store", records_dir=records)
        job = await env.merges.submit(request(method="test_blocking"))
        await family.entered.wait()
        restarted = make_env(tmp_path / "store", records_dir=records)
        view = restarted.merges.view(job.id)
        assert view is not None and view["name"] == "m"
        assert (view["state"], view["error"]) == (
            "interrupted",
            "the server stopped while the job ran",
        )
        env.merges.cancel(job.id)
        await job.task

    run(scenario())
