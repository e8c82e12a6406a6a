"""Migration jobs without servers: the old server, the tokenizers and the Migrator are faked.

Shown: every refusal of ``submit`` (nothing forwarded, no job), one migration at a time even
when two are posted at once, each adapter's outcome (switched only after its registration,
otherwise still forwarded to the old server), rollback waiting for the job and forwarding again
before it removes, and the forwarding restored from earlier runs' records.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.jobs.kinds import JobCancelled
from vllm_lora_ext.jobs.runners import JobFailed
from vllm_lora_ext.migrate.source import SourceError, SourceInfo
from vllm_lora_ext.migrate.spec import MigrationSpec, Seed
from vllm_lora_ext.server.job_records import JOBS_DIR
from vllm_lora_ext.server.migrations import jobs as jobs_module
from vllm_lora_ext.server.migrations.forwarding import ForwardTable
from vllm_lora_ext.server.migrations.job import AdapterMigration, MigrationJob, MigrationRequest
from vllm_lora_ext.server.migrations.jobs import MigrationJobs

T = TypeVar("T")
OLD = "http://old:8000"
SOURCE = SourceInfo(OLD, "old-base", ("old-base", "a", "b", "c", "d"), ("a", "b", "c", "d"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a scenario in a fresh event loop; a hang fails the test instead of blocking it."""
    return asyncio.run(asyncio.wait_for(coro, 60))


class FakeAdapters:
    """The service calls a migration makes; each call notes where the name was routed then."""

    def __init__(self, root: Path, forward: ForwardTable) -> None:
        self.store = SimpleNamespace(root=root)
        self.forward = forward
        self.served: set[str] = set()
        self.refuse: set[str] = set()
        self.log: list[str] = []

    def get(self, name: str) -> object | None:
        return object() if name in self.served else None

    async def register_from_path(self, name: str, source: Path, origin: str) -> None:
        self.log.append(f"register:{name} routed={self.forward.target(name)}")
        if name in self.refuse:
            raise Refused("shape_mismatch", "does not fit")
        self.served.add(name)

    async def remove(self, name: str) -> bool:
        self.log.append(f"remove:{name} routed={self.forward.target(name)}")
        self.served.discard(name)
        return True


class FakeJob:
    """A running job of :class:`FakeRunner`; ``result`` is what its adapter's outcome says."""

    where = "fake"

    def __init__(self, params: dict[str, Any], outcome: Outcome) -> None:
        self.params, self.outcome = params, outcome
        self.cancelled = asyncio.Event()

    def progress(self) -> dict[str, Any]:
        return {"train_step": 0}

    def cancel(self) -> None:
        self.cancelled.set()

    async def result(self) -> dict[str, Any]:
        return await self.outcome(self)


Outcome = Callable[[FakeJob], Coroutine[Any, Any, dict[str, Any]]]


class FakeRunner:
    """Stands in for a job runner (our protocol): what each adapter's job ends with is in
    ``outcomes``; every start is noted with its parameters and secrets."""

    name = "in_process"

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.started: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def start(self, folder: Any, secrets: dict[str, str]) -> FakeJob:
        kind, params = folder.read_spec()
        assert kind == "migration"
        self.started.append((params, secrets))
        return FakeJob(params, self.outcomes[params["spec"]["adapter"]])


def result(job: FakeJob, passed: bool) -> dict[str, Any]:
    """A finished migration job's result: the student's folder and the gate's verdict."""
    reason = "ok" if passed else "agreement 0.2 < 0.8"
    gate = {"passed": passed, "reason": reason, "n": 5, "agreement": 0.2}
    return {"adapter_dir": job.params["work_dir"] + "/adapter", "passed": passed, "gate": gate}


async def passes(job: FakeJob) -> dict[str, Any]:
    return result(job, passed=True)


async def refused_by_gate(job: FakeJob) -> dict[str, Any]:
    return result(job, passed=False)


async def crashes(job: FakeJob) -> dict[str, Any]:
    raise JobFailed("out of memory")


@dataclass
class Env:
    forward: ForwardTable
    adapters: FakeAdapters
    jobs: MigrationJobs
    old_base: Path
    runner: FakeRunner


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Env]:
    """No HTTP, no tokenizer, no training: the old server is :data:`SOURCE`, every adapter has
    three observed prompts, and jobs run on :class:`FakeRunner`."""
    monkeypatch.setattr(jobs_module, "describe_source", lambda *a: SOURCE)
    monkeypatch.setattr(jobs_module, "observed_inputs", lambda *a: ["q1", "q2", "q3"])
    monkeypatch.setattr(jobs_module, "_tokenizer", lambda path: object())
    old_base = tmp_path / "old-base"
    old_base.mkdir()
    (old_base / "config.json").write_text("{}")

    def make(stopping: Callable[[], bool] = lambda: False, api_key: str | None = "k") -> Env:
        forward = ForwardTable()
        adapters = FakeAdapters(tmp_path / "store", forward)
        runner = FakeRunner()
        jobs = MigrationJobs(
            adapters,  # type: ignore[arg-type]
            forward,
            new_base=tmp_path / "new-base",
            find_source_model=lambda base: None,
            self_url="http://self:8000",
            base_name="new-base",
            api_key=api_key,
            server_stopping=stopping,
            runner=runner,  # type: ignore[arg-type]
        )
        return Env(forward, adapters, jobs, old_base, runner)

    return make


def body(env: Env, **kw: Any) -> MigrationRequest:
    return MigrationRequest.model_validate(
        {"source_url": OLD, "source_model_path": str(env.old_base)} | kw
    )


def records_dir(env: Env) -> Path:
    return env.adapters.store.root / JOBS_DIR / "migrations"


def spec(name: str) -> MigrationSpec:
    seeds = [Seed(input=f"q{i}") for i in range(3)]
    return MigrationSpec(adapter=name, task_description="questions", seeds=seeds)


Setup = Callable[[Env, pytest.MonkeyPatch], None]


def _busy(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.jobs.book.jobs["j0"] = MigrationJob("j0", body(env), SOURCE, env.old_base, [])


def _served_here(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.adapters.served.add("b")


def _source_down(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*a: Any) -> SourceInfo:
        raise SourceError("cannot reach the source server")

    monkeypatch.setattr(jobs_module, "describe_source", down)


def _wrong_base(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(*a: Any) -> SourceInfo:
        raise SourceError("serves another base", 409, "wrong_source_base")

    monkeypatch.setattr(jobs_module, "describe_source", wrong)


def _no_adapters(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = SourceInfo(OLD, "old-base", ("old-base",), ())
    monkeypatch.setattr(jobs_module, "describe_source", lambda *a: empty)


def _no_prompts(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "observed_inputs", lambda *a: ["only one"])


def _prompts_unreachable(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*a: Any) -> list[str]:
        raise SourceError("cannot reach the source server", 502)

    monkeypatch.setattr(jobs_module, "observed_inputs", down)


def _other_tokenizer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "tokenizer_mismatch", lambda a, b: "vocabularies differ")


REFUSALS: list[tuple[str, dict[str, Any], Setup | None, str, int]] = [
    ("another runs", {}, _busy, "job_conflict", 409),
    ("source down", {}, _source_down, "source_unavailable", 502),
    ("wrong source base", {}, _wrong_base, "wrong_source_base", 409),
    ("source serves none", {}, _no_adapters, "not_found", 409),
    ("not on the source", {"adapters": ["a", "zz"]}, None, "unknown_adapter", 404),
    ("served here", {}, _served_here, "already_served", 409),
    ("tasks for others", {"adapters": ["a"], "tasks": {"b": {}}}, None, "invalid_body", 400),
    ("no old base", {"source_model_path": None}, None, "no_source_model", 400),
    ("old base not a model", {"source_model_path": "/"}, None, "no_source_model", 400),
    (
        "token_kl across tokenizers",
        {"options": {"distillation": "token_kl"}},
        _other_tokenizer,
        "tokenizer_mismatch",
        400,
    ),
    ("too few examples", {}, _no_prompts, "too_few_examples", 409),
    ("prompts unreachable", {}, _prompts_unreachable, "source_unavailable", 502),
]


@pytest.mark.parametrize(
    ("overrides", "setup", "reason", "status"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_submit_refuses(
    fakes: Callable[..., Env],
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    setup: Setup | None,
    reason: str,
    status: int,
) -> None:
    """Each refusal has its reason and status, and leaves no job and no forwarding behind."""

    async def scenario() -> None:
        env = fakes()
        if setup is not None:
            setup(env, monkeypatch)
        request = body(env, **overrides)
        jobs_before = dict(env.jobs.book.jobs)
        with pytest.raises(Refused) as e:
            await env.jobs.submit(request)
        assert (e.value.reason, e.value.status) == (reason, status), e.value.message
        assert env.forward.routes == {} and env.jobs.book.jobs == jobs_before
        assert env.adapters.log == []

    run(scenario())


def test_two_submits_at_once_start_one_migration(
    fakes: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Posted together: one job starts (its adapters forwarded to the old server with this
    server's key), the other is refused 409 ``job_conflict``."""

    async def scenario() -> None:
        release = asyncio.Event()

        async def hold(self: MigrationJobs, job: MigrationJob) -> None:
            await release.wait()

        monkeypatch.setattr(MigrationJobs, "_run", hold)
        env = fakes()
        results = await asyncio.gather(
            env.jobs.submit(body(env, adapters=["a"])),
            env.jobs.submit(body(env, adapters=["b"])),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, MigrationJob)]
        refused = [r for r in results if isinstance(r, Refused)]
        assert len(started) == 1 and len(refused) == 1
        assert (refused[0].reason, refused[0].status) == ("job_conflict", 409)
        assert env.forward.routes == {"a": OLD}
        assert env.forward.auth[OLD] == {"Authorization": "Bearer k"}
        assert env.jobs.active() is started[0]
        release.set()
        await started[0].task

    run(scenario())


def test_each_adapter_ends_switched_or_still_forwarded(fakes: Callable[..., Env]) -> None:
    """A passing gate registers the adapter while requests are still forwarded, then serves it
    here; a refused gate, a crash or a store refusal keep it on the old server, saying why."""

    async def scenario() -> None:
        env = fakes()
        env.runner.outcomes.update(a=passes, b=refused_by_gate, c=crashes, d=passes)
        env.adapters.refuse.add("d")
        job = await env.jobs.submit(body(env))
        assert set(env.forward.routes) == {"a", "b", "c", "d"}
        await job.task
        states = {m.name: (m.state, m.error) for m in job.adapters}
        assert states == {
            "a": ("switched", None),
            "b": ("kept_old", "gate refused the migrated adapter: agreement 0.2 < 0.8"),
            "c": ("failed", "out of memory"),
            "d": ("failed", "the migrated adapter was refused by the store: does not fit"),
        }
        assert env.adapters.log == [f"register:a routed={OLD}", f"register:d routed={OLD}"]
        assert env.forward.routes == {"b": OLD, "c": OLD, "d": OLD}
        assert job.state == "done" and job.finished_at is not None
        saved = json.loads((records_dir(env) / f"{job.id}.json").read_text())
        assert saved["state"] == "done"
        assert [a["state"] for a in saved["adapters"]] == [
            "switched",
            "kept_old",
            "failed",
            "failed",
        ]
        assert "source_api_key" not in saved["request"]
        # Each job gets the keys in its secrets, never in its parameters (written to disk).
        for params, secrets in env.runner.started:
            assert secrets == {"source": "k", "self": "k"}
            assert '"k"' not in json.dumps(params) and params["teacher"]["url"] == OLD

    run(scenario())


def test_a_failure_while_the_server_stops_reads_interrupted(fakes: Callable[..., Env]) -> None:
    """Stopping: a crashed adapter reads ``interrupted`` (resumable), the job too; a switched
    adapter stays switched."""

    async def scenario() -> None:
        env = fakes(stopping=lambda: True)
        env.runner.outcomes.update(a=passes, c=crashes)
        job = await env.jobs.submit(body(env, adapters=["a", "c"]))
        await job.task
        assert [(m.name, m.state) for m in job.adapters] == [
            ("a", "switched"),
            ("c", "interrupted"),
        ]
        assert job.state == "interrupted"

    run(scenario())


def test_rollback_during_a_run_cancels_and_keeps_everything_on_the_old_server(
    fakes: Callable[..., Env],
) -> None:
    """Rolling back while the first adapter migrates: its job is cancelled, the next
    adapters never start, nothing is registered, every adapter stays forwarded."""

    async def scenario() -> None:
        started = asyncio.Event()

        async def until_cancelled(job: FakeJob) -> dict[str, Any]:
            started.set()
            await job.cancelled.wait()
            raise JobCancelled("cancelled")

        env = fakes()
        env.runner.outcomes.update(a=until_cancelled, b=passes)
        job = await env.jobs.submit(body(env, adapters=["a", "b"]))
        await started.wait()
        assert env.jobs.rollback(job.id) is job
        assert job.state == "rolling_back" and job.cancelled
        await job.rollback_task
        assert [(m.name, m.state) for m in job.adapters] == [("a", "cancelled"), ("b", "cancelled")]
        assert job.state == "rolled_back" and env.adapters.log == []
        assert env.forward.routes == {"a": OLD, "b": OLD}

    run(scenario())


def test_rollback_waits_for_the_job_then_forwards_before_removing(
    fakes: Callable[..., Env],
) -> None:
    """A switched adapter is forwarded to the old server again before it is removed here, and
    only once the job's own task has ended; other adapters are left as they were."""

    async def scenario() -> None:
        env = fakes()
        order = env.adapters.log  # the job and the service note what they did, in turn
        running, release = asyncio.Event(), asyncio.Event()

        async def still_running() -> None:
            running.set()
            await release.wait()
            order.append("job ended")

        migrations = [
            AdapterMigration("a", spec("a"), Path("wa"), state="switched"),
            AdapterMigration("b", spec("b"), Path("wb"), state="kept_old"),
        ]
        job = MigrationJob("j1", body(env), SOURCE, env.old_base, migrations)
        env.adapters.served.add("a")
        env.forward.forward("b", OLD)
        env.jobs.book.start(job, still_running())
        await running.wait()
        assert env.jobs.rollback(job.id) is job
        task = job.rollback_task
        assert job.state == "rolling_back" and task is not None
        assert env.jobs.rollback(job.id) is job and job.rollback_task is task  # idempotent
        release.set()
        await task
        assert order == ["job ended", f"remove:a routed={OLD}"]
        assert [(m.name, m.state) for m in job.adapters] == [
            ("a", "rolled_back"),
            ("b", "kept_old"),
        ]
        assert job.state == "rolled_back" and env.forward.routes == {"a": OLD, "b": OLD}
        assert env.jobs.rollback(job.id) is job and job.rollback_task is task
        assert env.jobs.rollback("nope") is None
        saved = json.loads((records_dir(env) / "j1.json").read_text())
        assert saved["state"] == "rolled_back"

    run(scenario())


def test_a_restart_forwards_what_earlier_runs_left_on_the_old_server(tmp_path: Path) -> None:
    """Adapters an earlier run did not switch are forwarded again (later records win); a
    switched one, or one served here now, is not."""
    records = tmp_path / "store" / JOBS_DIR / "migrations"
    records.mkdir(parents=True)
    older = {
        "id": "j1",
        "state": "running",
        "source_url": "http://one:8000",
        "adapters": [
            {"name": "a", "state": "kept_old"},
            {"name": "b", "state": "switched"},
            {"name": "c", "state": "running"},
            {"name": "d", "state": "failed"},
            {"name": "e", "state": "rolled_back"},
        ],
    }
    newer = {
        "id": "j2",
        "state": "done",
        "source_url": "http://two:8000",
        "adapters": [{"name": "a", "state": "switched"}, {"name": "e", "state": "kept_old"}],
    }
    now = time.time()
    for age, record in ((200, older), (100, newer)):
        path = records / f"{record['id']}.json"
        path.write_text(json.dumps(record))
        os.utime(path, (now - age, now - age))
    served_here = {"d"}

    forward = ForwardTable()
    adapters = FakeAdapters(tmp_path / "store", forward)
    adapters.served |= served_here
    jobs = MigrationJobs(
        adapters,  # type: ignore[arg-type]
        forward,
        new_base=tmp_path,
        find_source_model=lambda base: None,
        self_url="http://self:8000",
        base_name="new",
        api_key="k",
    )
    assert forward.routes == {"c": "http://one:8000", "e": "http://two:8000"}
    assert forward.auth["http://one:8000"] == {"Authorization": "Bearer k"}
    view = jobs.view("j1")
    assert view["state"] == "interrupted"
    assert [a["state"] for a in view["adapters"]][2] == "interrupted"
