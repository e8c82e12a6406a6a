"""Merge and migration job records on disk, so a restart forgets no job a client may poll.

Each job's view is written (whole or absent) when it starts and each time it reaches a
milestone; on start the server lists them as they were, except that a job which was still
running when the server stopped now reads ``interrupted``: nothing runs it any more. A
migration resumes from its checkpoints when the same request is posted again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_lora_ext.files import write_atomic

JOBS_DIR = ".jobs"
MAX_RECORDS = 1000
"""Records kept per kind; the oldest go first (a long-lived server must not grow without end)."""
INTERRUPTED = "interrupted"
logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines


class JobRecords:
    def __init__(self, directory: Path, live_states: frozenset[str]) -> None:
        self.dir = Path(directory)
        self.live_states = live_states
        """States that mean "still running": read back as ``interrupted``."""
        self.restored: dict[str, dict[str, Any]] = self._load()

    def views(self, live: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every job: earlier runs' records, then this run's jobs (``live``, by id)."""
        restored = [r for i, r in self.restored.items() if i not in live]
        return [*restored, *(job.view() for job in live.values())]

    def view(self, job_id: str, live: Mapping[str, Any]) -> dict[str, Any] | None:
        job = live.get(job_id)
        return job.view() if job is not None else self.restored.get(job_id)

    def save(self, job_id: str, record: dict[str, Any]) -> None:
        """Logged, not raised, on failure: bookkeeping must not fail the job it records."""
        self.save_quietly(self.dir / f"{job_id}.json", record)
        self._prune()

    def _load(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(self.dir.glob("*.json"), key=_mtime):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("vllm-lora-ext: unreadable job record %s skipped", path)
                continue
            if not isinstance(record, dict) or "id" not in record:
                continue
            if record.get("state") in self.live_states:
                record = interrupted(record, self.live_states)
                self.save_quietly(path, record)
            out[str(record["id"])] = record
        return out

    def save_quietly(self, path: Path, record: dict[str, Any]) -> None:
        try:
            write_atomic(path, json.dumps(record).encode())
        except OSError:
            logger.warning("vllm-lora-ext: cannot update job record %s", path)

    def _prune(self) -> None:
        records = sorted(self.dir.glob("*.json"), key=_mtime)
        for path in records[: max(0, len(records) - MAX_RECORDS)]:
            path.unlink(missing_ok=True)
            self.restored.pop(path.stem, None)


def interrupted(record: dict[str, Any], live_states: frozenset[str]) -> dict[str, Any]:
    """A record of a job the server stopped under: it and its running parts read
    ``interrupted``."""
    out = {**record, "state": INTERRUPTED}
    if out.get("error") is None and "error" in out:
        out["error"] = "the server stopped while the job ran"
    if isinstance(out.get("adapters"), list):  # a migration's per-adapter states
        out["adapters"] = [
            {**a, "state": INTERRUPTED} if a.get("state") in live_states else a
            for a in out["adapters"]
        ]
    return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
