"""What a job can be, and how any runner executes one: :func:`execute` on its folder.

Each kind is a function ``(params, context) -> result`` in its own module, imported only when
a job of that kind runs (a migration pulls in transformers and peft; the server process never
needs to). The same :func:`execute` runs in a child process, in a thread (``in_process``) and
on a Ray worker, so the three give the same adapters from the same spec.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_lora_ext.jobs.folder import JobFolder

KINDS: dict[str, str] = {
    "migration": "vllm_lora_ext.jobs.migration",
    "iteris_solve": "vllm_lora_ext.jobs.iteris",
    "pool_merge": "vllm_lora_ext.jobs.pool",
}
"""Kind -> the module whose ``run(params, context)`` does it."""


class JobCancelled(RuntimeError):
    """The job stopped because it was asked to; its checkpoints stay for a resume."""


@dataclass
class JobContext:
    """What a running job gets besides its parameters."""

    folder: JobFolder
    secrets: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    min_report_interval: float = 0.25
    _last_report: float = field(default=0.0, repr=False)

    def stopping(self) -> bool:
        return self.stop.is_set()

    def report(self, progress: dict[str, Any], *, force: bool = False) -> None:
        """Publish progress (at most every ``min_report_interval`` s unless forced)."""
        now = time.monotonic()
        if force or now - self._last_report >= self.min_report_interval:
            self._last_report = now
            self.folder.write_progress(progress)


JobFunction = Callable[[dict[str, Any], JobContext], dict[str, Any]]


def job_function(kind: str) -> JobFunction:
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r} (known: {', '.join(KINDS)})")
    return importlib.import_module(KINDS[kind]).run


def stops_at_checks(folder: JobFolder) -> bool:
    """Whether the folder's kind checks :meth:`JobContext.stopping` (and checkpoints before it
    stops); one that does not (or an unreadable spec) is simply ended when asked to stop."""
    try:
        kind, _ = folder.read_spec()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return kind in KINDS and bool(getattr(importlib.import_module(KINDS[kind]), "STOPS", False))


def execute(context: JobContext) -> dict[str, Any]:
    """Run the folder's job; its result (also in ``result.json``), or raise after writing
    ``error.json`` (kind ``cancelled`` or ``failed``) so every runner reports the same way."""
    folder = context.folder
    try:
        kind, params = folder.read_spec()
        result = job_function(kind)(params, context)
    except JobCancelled as e:
        folder.write_error("cancelled", str(e))
        raise
    except BaseException as e:
        if context.stopping():  # asked to stop, and the step ended in an error: a cancel
            folder.write_error("cancelled", f"cancelled ({type(e).__name__}: {e})")
            raise JobCancelled(str(e)) from e
        folder.write_error("failed", f"{type(e).__name__}: {e}")
        raise
    folder.write_result(result)
    return result
