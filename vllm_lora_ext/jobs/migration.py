"""The ``migration`` job: one adapter's :class:`~vllm_lora_ext.migrate.migrator.Migrator` run.

Parameters (JSON): the spec, the work folder of its checkpoints, the two base folders, and the
servers it talks to (``teacher``/``old_base`` on the old server; ``generator`` on either). A
server's key is named, not given: ``headers_secret`` is a key of the job's secrets.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm_lora_ext.jobs.kinds import JobCancelled, JobContext

REPORT_SECONDS = 0.5
STOPS = True
"""Stops at its next check when asked (the Migrator's steps, the training loops)."""


def params(
    *,
    spec: dict[str, Any],
    work_dir: Path,
    old_base: Path,
    new_base: Path,
    source_url: str,
    source_base: str,
    adapter: str,
    generator_url: str | None,
    generator_model: str | None,
    seeded: bool,
) -> dict[str, Any]:
    """The job's parameters; with ``generator_url`` None the old server's base generates."""
    return {
        "spec": spec,
        "work_dir": str(work_dir),
        "old_base": str(old_base),
        "new_base": str(new_base),
        "source": {"url": source_url, "model": source_base, "headers_secret": "source"},
        "teacher": {"url": source_url, "model": adapter, "headers_secret": "source"},
        "generator": None
        if generator_url is None
        else {"url": generator_url, "model": generator_model, "headers_secret": "self"},
        "seeded": seeded,
    }


def run(p: dict[str, Any], context: JobContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from vllm_lora_ext.evaluation.backends import HttpBackend
    from vllm_lora_ext.migrate.migrator import MigrationCancelled, Migrator
    from vllm_lora_ext.migrate.spec import MigrationSpec

    old_base, new_base = Path(p["old_base"]), Path(p["new_base"])
    old_tokenizer = AutoTokenizer.from_pretrained(old_base)

    def backend(where: dict[str, Any], tokenizer: Any) -> HttpBackend:
        key = context.secrets.get(where["headers_secret"])
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return HttpBackend(where["url"], where["model"], tokenizer, headers=headers,
                           seeded=p["seeded"])  # fmt: skip

    source = backend(p["source"], old_tokenizer)
    generator = source
    if p["generator"] is not None:
        generator = backend(p["generator"], AutoTokenizer.from_pretrained(new_base))
    migrator = Migrator(
        MigrationSpec.model_validate(p["spec"]),
        Path(p["work_dir"]),
        old_base=old_base,
        new_base=new_base,
        generator=generator,
        teacher=backend(p["teacher"], old_tokenizer),
        old_base_backend=source,
    )
    done = threading.Event()

    def publish() -> None:  # progress, and a stop request passed on to the migrator
        while not done.wait(REPORT_SECONDS):
            if context.stopping():
                migrator.cancel()
            context.report(_progress(migrator), force=True)

    reporter = threading.Thread(target=publish, name="migration-progress", daemon=True)
    reporter.start()
    try:
        result = migrator.run()
    except MigrationCancelled as e:
        raise JobCancelled(str(e)) from e
    finally:
        done.set()
        reporter.join()
        context.report(_progress(migrator), force=True)
    return {
        "adapter_dir": str(result.adapter_dir),
        "passed": result.passed,
        "gate": asdict(result.gate),
    }


def _progress(migrator: Any) -> dict[str, Any]:
    progress = asdict(migrator.progress)
    progress.pop("gate", None)
    return progress
