"""Hot base-model upgrade: carry every adapter of an old server over to this one (Trans-LoRA).

``POST /v1/migrations`` (or ``serve --migrate-from``) names the old server. From that moment
every adapter it serves is answered here: forwarded to the old server until its migration
passes the gate, then switched to the migrated adapter served on this base. Per adapter, in
order: pull its observed prompts, run the :class:`~vllm_lora_ext.migrate.migrator.Migrator`
as a job (:mod:`vllm_lora_ext.jobs`: a child process by default, so the discriminator and the
student never train in the serving process; the old server generates, labels and teaches over
HTTP), then, if the gate passes, register the student in the store (staged,
validated, renamed, loaded) and stop forwarding. A refused gate, a failure or a cancel keeps the
adapter on the old server and says why. ``DELETE`` cancels and rolls back: switched adapters are
forwarded again and their migrated copies removed.

Checkpoints live in ``<store>/.migrations/<adapter>-<spec hash>/``: a restarted server given
the same request resumes each adapter where it stopped. The request and a job's state are
:mod:`.job`; this module is the service that runs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vllm_lora_ext.auth import bearer
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.jobs import migration as migration_job
from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.kinds import JobCancelled
from vllm_lora_ext.jobs.runners import JobRunner, RunningJob, SubprocessRunner, run_to_end
from vllm_lora_ext.migrate.queries import tokenizer_mismatch
from vllm_lora_ext.migrate.source import SourceError, SourceInfo, describe_source, observed_inputs
from vllm_lora_ext.migrate.spec import MigrationSpec
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.job_records import JOBS_DIR
from vllm_lora_ext.server.jobs import JobBook, new_job_id
from vllm_lora_ext.server.migrations.forwarding import ForwardTable
from vllm_lora_ext.server.migrations.job import (
    AdapterMigration,
    AdapterState,
    AdapterTask,
    MigrationJob,
    MigrationRequest,
)

WORK_DIR = ".migrations"
JOB_DIR = "job"
"""In an adapter's work folder: the job's spec, progress, result and stderr."""
logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines
_BUSY = frozenset({"running", "rolling_back"})

# source base name -> a local folder of that model, if this server knows one (e.g. the default)
SourceModelFinder = Callable[[str], Path | None]


class MigrationJobs:
    """All migrations of this server; one runs at a time."""

    def __init__(
        self,
        adapters: AdapterService,
        forward: ForwardTable,
        new_base: Path,
        find_source_model: SourceModelFinder,
        self_url: str,
        base_name: str,
        api_key: str | None = None,
        server_stopping: Callable[[], bool] = lambda: False,
        runner: JobRunner | None = None,
    ) -> None:
        self.server_stopping = server_stopping
        self.runner = runner or SubprocessRunner()
        """Runs each adapter's Migrator (a child process unless configured otherwise)."""
        self.adapters = adapters
        self.api_key = api_key
        """This server's key: on its calls to itself, and to the old server by default."""
        self.forward = forward
        self.new_base = Path(new_base)
        self.find_source_model = find_source_model
        self.self_url, self.base_name = self_url, base_name
        """This server, for ``generator: new_base`` (its own /v1/completions)."""
        self._submitting = asyncio.Lock()
        self.book: JobBook[MigrationJob] = JobBook(
            adapters.store.root / JOBS_DIR / "migrations",
            frozenset({"running", "rolling_back", "pending"}),
        )
        """Migrations of earlier runs (finished, or ``interrupted`` by the server's stop: post
        the same request again to resume from their checkpoints)."""
        self._restore_forwarding()

    def _restore_forwarding(self) -> None:
        """Adapters an earlier run forwarded to an old server (every one not switched: pending,
        interrupted, kept on the old server, rolled back) are forwarded again, so a restart
        does not turn their requests into 404s. Later records win; an adapter served here now
        is not forwarded."""
        for record in self.book.restored.values():
            url = record.get("source_url")
            for adapter in record.get("adapters") or []:
                name = adapter.get("name") if isinstance(adapter, dict) else None
                if not isinstance(url, str) or not isinstance(name, str):
                    continue
                if adapter.get("state") == "switched" or self.adapters.get(name) is not None:
                    self.forward.stop_forwarding(name)
                else:
                    self.forward.forward(name, url, bearer(self.api_key))

    def views(self) -> list[dict[str, Any]]:
        return self.book.views()

    def view(self, job_id: str) -> dict[str, Any] | None:
        return self.book.view(job_id)

    @property
    def work_root(self) -> Path:
        return self.adapters.store.root / WORK_DIR

    def active(self) -> MigrationJob | None:
        return next((j for j in self.book.jobs.values() if j.state in _BUSY), None)

    # -- submission ---------------------------------------------------------------------------

    async def submit(self, request: MigrationRequest) -> MigrationJob:
        """Check the source, the adapters and their examples (4xx/502), then start the job."""
        async with self._submitting:  # two POSTs at once must not both pass the check below
            return await self._submit(request)

    async def _submit(self, request: MigrationRequest) -> MigrationJob:
        if (running := self.active()) is not None:
            raise Refused("job_conflict", f"migration {running.id} is still running", 409)
        source_headers = self._source_headers(request)
        try:
            source = await asyncio.to_thread(
                describe_source, request.source_url, request.source_model, 10.0, source_headers
            )
        except SourceError as e:
            raise Refused(e.reason, str(e), e.status) from e
        names = request.adapters or list(source.adapters)
        if not names:
            raise Refused("not_found", f"the source server {source.url} serves no adapters", 409)
        for name in names:
            if name not in source.adapters:
                raise Refused(
                    "unknown_adapter", f"adapter {name!r} is not served by {source.url}", 404
                )
            if self.adapters.get(name) is not None:
                raise Refused("already_served", f"adapter {name!r} is already served here", 409)
        unknown = set(request.tasks) - set(names)
        if unknown:
            raise Refused(
                "invalid_body", f"tasks given for adapters not migrated: {sorted(unknown)}"
            )
        # May convert the embedded default model once (~25 s): off the event loop.
        old_base = await asyncio.to_thread(self._old_base, request, source)
        tokenizer = await asyncio.to_thread(_tokenizer, old_base)
        if request.options.distillation == "token_kl":
            own_tokenizer = await asyncio.to_thread(_tokenizer, self.new_base)
            if (why := tokenizer_mismatch(tokenizer, own_tokenizer)) is not None:
                raise Refused(
                    "tokenizer_mismatch", f"token-level distillation is not possible: {why}"
                )
        migrations = []
        for name in names:
            try:
                reservoir = await asyncio.to_thread(
                    observed_inputs, source.url, name, tokenizer, 30.0, source_headers
                )
            except SourceError as e:
                raise Refused(e.reason, str(e), e.status) from e
            migrations.append(self._adapter_migration(request, source, name, reservoir))
        job = MigrationJob(new_job_id(), request, source, old_base, migrations)
        for migration in migrations:
            self.forward.forward(migration.name, source.url, source_headers)
        self.book.start(job, self._run(job))
        self._count_states()
        return job

    def _source_headers(self, request: MigrationRequest) -> dict[str, str]:
        key = request.source_api_key
        return bearer(key.get_secret_value() if key is not None else self.api_key)

    def _old_base(self, request: MigrationRequest, source: SourceInfo) -> Path:
        if request.source_model_path is not None:
            path = Path(request.source_model_path)
        else:
            found = self.find_source_model(source.base)
            if found is None:
                raise Refused(
                    "no_source_model",
                    f"give source_model_path: a local folder of the old base {source.base!r} "
                    "(its tokenizer frames the old server's prompts; the discriminator trains "
                    "on it)",
                )
            path = found
        if not (path / "config.json").is_file():
            raise Refused(
                "no_source_model", f"{str(path)!r} is not a model folder (no config.json)"
            )
        return path

    def _adapter_migration(
        self, request: MigrationRequest, source: SourceInfo, name: str, reservoir: list[str]
    ) -> AdapterMigration:
        task = request.tasks.get(name, AdapterTask())
        try:
            spec = MigrationSpec(
                **request.options.model_dump(),
                adapter=name,
                task_description=task.task_description or f"{name.replace('_', ' ')} questions",
                seeds=task.seeds,
                reservoir=reservoir,
                choice_prefix=task.choice_prefix,
            )
        except ValidationError as e:
            detail = "; ".join(err["msg"] for err in e.errors())
            raise Refused(
                "too_few_examples",
                f"{detail}. Give seeds in tasks[{name!r}].seeds, or capture traffic on the "
                f"source (POST /v1/stats/{name}/start) so that its reservoir fills",
                409,
            ) from e
        identity = json.dumps(
            [source.base, str(self.new_base), request.generator, spec.model_dump(mode="json")],
            sort_keys=True,
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return AdapterMigration(name, spec, self.work_root / f"{name}-{digest}")

    # -- execution ----------------------------------------------------------------------------

    async def _run(self, job: MigrationJob) -> None:
        try:
            for migration in job.adapters:
                if job.cancelled:
                    migration.state = "cancelled"
                    continue
                await self._migrate_one(job, migration)
                self._count_states()
                self.book.save(job)
        finally:
            if job.state == "running":
                job.state = "cancelled" if job.cancelled else "done"
                if self.server_stopping():
                    job.state = "interrupted"
            job.finish()
            self._count_states()
            self.book.save(job)

    def _job_params(self, job: MigrationJob, migration: AdapterMigration) -> dict[str, Any]:
        new_base = job.request.generator == "new_base"
        return migration_job.params(
            spec=migration.spec.model_dump(mode="json"),
            work_dir=migration.work_dir,
            old_base=job.old_base,
            new_base=self.new_base,
            source_url=job.source.url,
            source_base=job.source.base,
            adapter=migration.name,
            generator_url=self.self_url if new_base else None,
            generator_model=self.base_name if new_base else None,
            seeded=job.request.options.sampling == "seeded",
        )

    def _secrets(self, job: MigrationJob) -> dict[str, str]:
        """The keys the job needs, passed in its environment (never written to its folder)."""
        source = job.request.source_api_key
        source_key = source.get_secret_value() if source is not None else self.api_key
        keys = {"source": source_key, "self": self.api_key}
        return {name: key for name, key in keys.items() if key}

    async def _migrate_one(self, job: MigrationJob, migration: AdapterMigration) -> None:
        migration.state = "running"
        started = time.monotonic()
        folder = JobFolder(migration.work_dir / JOB_DIR)

        def started_job(running: RunningJob) -> None:
            migration.job = running
            if job.cancelled:  # rolled back while the job was starting
                running.cancel()

        try:
            result = await run_to_end(
                self.runner, folder, "migration", self._job_params(job, migration),
                secrets=self._secrets(job), on_start=started_job,
                on_progress=lambda _: self._report(migration),
            )  # fmt: skip
            self._report(migration)
            migration.gate = result["gate"]
            if not result["passed"]:
                migration.state = "kept_old"
                migration.error = f"gate refused the migrated adapter: {result['gate']['reason']}"
            elif job.cancelled:
                migration.state = "cancelled"
            else:
                await self._switch(job, migration, Path(result["adapter_dir"]))
        except JobCancelled as e:
            migration.state, migration.error = "cancelled", str(e)
        except Exception as e:
            migration.state, migration.error = "failed", str(e)
        if migration.state in ("failed", "cancelled") and self.server_stopping():
            migration.state = "interrupted"  # resumes from its checkpoints when posted again
        migration.seconds = round(time.monotonic() - started, 1)
        metrics.MIGRATION_SECONDS.labels(state=migration.state).inc(migration.seconds)

    async def _switch(self, job: MigrationJob, migration: AdapterMigration, adapter: Path) -> None:
        """Register (all or nothing), then flip the route: no request finds neither."""
        try:
            await self.adapters.register_from_path(
                migration.name, adapter, origin=f"migrated from {job.source.url}"
            )
        except Refused as e:
            migration.state = "failed"
            migration.error = f"the migrated adapter was refused by the store: {e.message}"
            return
        self.forward.stop_forwarding(migration.name)
        migration.state = "switched"

    def _report(self, migration: AdapterMigration) -> None:
        p = migration.progress()
        if p is None:
            return
        for name in ("generated", "kept", "rejected", "labelled", "train_step", "loss"):
            if isinstance(p.get(name), int | float):
                metrics.MIGRATION_PROGRESS.labels(adapter=migration.name, field=name).set(p[name])

    def _count_states(self) -> None:
        counts: dict[str, int] = dict.fromkeys(AdapterState.__args__, 0)
        for job in self.book.jobs.values():
            for migration in job.adapters:
                counts[migration.state] += 1
        for state, n in counts.items():
            metrics.MIGRATION_ADAPTERS.labels(state=state).set(n)

    # -- cancel and roll back -----------------------------------------------------------------

    def rollback(self, job_id: str) -> MigrationJob | None:
        """Start rolling the job back (idempotent); ``state`` says when it is done.

        In the background: each switched adapter is unloaded only after the requests already
        admitted for it finish, which may take as long as a generation.
        """
        job = self.book.get(job_id)
        if job is None:
            return None
        if job.state not in ("rolling_back", "rolled_back"):
            job.cancelled = True
            for migration in job.adapters:
                if migration.job is not None:
                    migration.job.cancel()
            job.state = "rolling_back"
            job.rollback_task = asyncio.create_task(self._roll_back(job))
        return job

    async def _roll_back(self, job: MigrationJob) -> None:
        if job.task is not None:
            await asyncio.shield(job.task)
        for migration in job.adapters:
            if migration.state == "switched":
                self.forward.forward(
                    migration.name, job.source.url, self._source_headers(job.request)
                )
                started = time.monotonic()
                await self.adapters.remove(migration.name)  # after its admitted requests
                logger.info(
                    "vllm-lora-ext: %r rolled back to %s in %.1f s",
                    migration.name,
                    job.source.url,
                    time.monotonic() - started,
                )
                migration.state = "rolled_back"
        job.state = "rolled_back"
        self._count_states()
        self.book.save(job)


def known_model_finder(cache_dir: Path) -> SourceModelFinder:
    """Finds the embedded default model (converted in the cache) by any of its names."""

    def find(name: str) -> Path | None:
        from vllm_lora_ext.base_models import (
            DEFAULT_MODEL_ALIASES,
            DEFAULT_MODEL_NAME,
            ensure_default_model,
        )

        if name not in (DEFAULT_MODEL_NAME, *DEFAULT_MODEL_ALIASES):
            return None
        return ensure_default_model(cache_dir)

    return find


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
