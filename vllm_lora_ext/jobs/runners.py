"""Who runs a job: a child process (the default), a thread of the server (``in_process``, kept
to measure what isolation buys), or Ray (:mod:`.ray_runner`).

Each runner starts a job from its folder and hands back a :class:`RunningJob`: its progress
(read from the folder), ``cancel()``, and ``await result()``, which returns the job's result or
raises :class:`JobFailed` (with the error, or the tail of a crashed child's stderr) or
:class:`~vllm_lora_ext.jobs.kinds.JobCancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from vllm_lora_ext.jobs.folder import SECRETS_ENV, JobFolder
from vllm_lora_ext.jobs.kinds import JobCancelled, JobContext, execute

RunnerName = Literal["subprocess", "in_process", "ray"]
CANCEL_GRACE_SECONDS = 10.0
"""After SIGTERM a child has this long to stop at a check before it is killed."""


class JobFailed(RuntimeError):
    """The job ended without a result; the message says why (its error or its stderr)."""


class RunningJob(Protocol):
    folder: JobFolder

    @property
    def where(self) -> str:
        """Where it runs, for the job's view: ``pid 1234``, ``thread``, ``ray task ...``."""
        ...

    def progress(self) -> dict[str, Any] | None: ...

    def cancel(self) -> None: ...

    async def result(self) -> dict[str, Any]: ...


class JobRunner(Protocol):
    name: RunnerName

    async def start(self, folder: JobFolder, secrets: dict[str, str]) -> RunningJob: ...


def outcome(folder: JobFolder, crashed: str | None) -> dict[str, Any]:
    """The job's result from its folder, or the error every runner raises the same way."""
    result = folder.read_result()
    if result is not None:
        return result
    error = folder.read_error()
    if error is not None and error.get("kind") == "cancelled":
        raise JobCancelled(error.get("message") or "cancelled")
    if error is not None:
        raise JobFailed(str(error.get("message")))
    raise JobFailed(crashed or "the job ended without a result")


# -- child process ------------------------------------------------------------------------------


@dataclass
class SubprocessRunner:
    """``python -m vllm_lora_ext.jobs run WORKDIR``: own interpreter, threads and device; a
    crash or an out-of-memory kill is the job's, never the server's."""

    threads: int | None = None
    device: str | None = None
    """``CUDA_VISIBLE_DEVICES`` of the child (e.g. ``1``: train beside, not on, the server's
    GPU); None: inherited."""
    name: RunnerName = "subprocess"

    async def start(self, folder: JobFolder, secrets: dict[str, str]) -> ChildJob:
        cmd = [sys.executable, "-m", "vllm_lora_ext.jobs", "run", str(folder.path),
               "--parent-pid", str(os.getpid())]  # fmt: skip
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        env = dict(os.environ)
        env[SECRETS_ENV] = json.dumps(secrets)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        folder.path.mkdir(parents=True, exist_ok=True)
        with folder.stderr_file.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        return ChildJob(folder, process)


@dataclass
class ChildJob:
    folder: JobFolder
    process: asyncio.subprocess.Process
    cancelled: bool = False

    @property
    def where(self) -> str:
        return f"pid {self.process.pid}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def progress(self) -> dict[str, Any] | None:
        return self.folder.read_progress()

    def cancel(self) -> None:
        """SIGTERM (the job checkpoints and stops at its next check), SIGKILL after a grace."""
        if self.cancelled or self.process.returncode is not None:
            return
        self.cancelled = True
        self.process.send_signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(CANCEL_GRACE_SECONDS, self._kill)

    def _kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def result(self) -> dict[str, Any]:
        code = await self.process.wait()
        if self.cancelled and self.folder.read_result() is None:
            error = self.folder.read_error() or {}
            raise JobCancelled(error.get("message") or f"cancelled ({_crash_message(code)})")
        return outcome(self.folder, _crash_message(code, self.folder))


def _crash_message(code: int, folder: JobFolder | None = None) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        why = f"the job's process was killed by {name}"
        if -code == signal.SIGKILL:
            why += " (out of memory, or killed by hand)"
    else:
        why = f"the job's process exited with code {code}"
    tail = folder.stderr_tail() if folder is not None else ""
    return f"{why}; its stderr ends:\n{tail}" if tail else why


# -- a thread of the server ---------------------------------------------------------------------


@dataclass
class InProcessRunner:
    """The pre-isolation path: the job in a thread of this process (benchmarks compare it)."""

    name: RunnerName = "in_process"

    async def start(self, folder: JobFolder, secrets: dict[str, str]) -> ThreadJob:
        context = JobContext(folder, secrets=secrets)
        return ThreadJob(folder, context, asyncio.create_task(asyncio.to_thread(execute, context)))


@dataclass
class ThreadJob:
    folder: JobFolder
    context: JobContext
    task: asyncio.Task

    where = "thread"

    def progress(self) -> dict[str, Any] | None:
        return self.folder.read_progress()

    def cancel(self) -> None:
        self.context.stop.set()

    async def result(self) -> dict[str, Any]:
        try:
            return await self.task
        except JobCancelled:
            raise
        except Exception as e:
            raise JobFailed(f"{type(e).__name__}: {e}") from e


PROGRESS_POLL_SECONDS = 0.5


async def run_to_end(
    runner: JobRunner,
    folder: JobFolder,
    kind: str,
    params: dict[str, Any],
    *,
    secrets: dict[str, str] | None = None,
    on_progress: Callable[[dict[str, Any]], None] = lambda p: None,
    on_start: Callable[[RunningJob], None] = lambda job: None,
) -> dict[str, Any]:
    """Write the spec, run the job, pass its progress on while it runs; its result.

    ``on_start`` gets the running job (to cancel it later). Cancelling the awaiting task
    cancels the job and waits for it to end, however often it is cancelled meanwhile (a child
    gets :data:`CANCEL_GRACE_SECONDS` before it is killed), so no job outlives its caller and
    the caller may remove the job's folder once this returns or raises.
    """
    folder.write_spec(kind, params)
    job = await runner.start(folder, secrets or {})
    on_start(job)
    finished = asyncio.ensure_future(job.result())
    try:
        while not finished.done():
            await asyncio.wait({finished}, timeout=PROGRESS_POLL_SECONDS)
            if (progress := job.progress()) is not None:
                on_progress(progress)
        return finished.result()
    except asyncio.CancelledError:
        job.cancel()
        while not finished.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({finished})
        with contextlib.suppress(Exception, asyncio.CancelledError):
            finished.result()  # retrieved: its outcome no longer matters
        raise


def make_runner(
    name: RunnerName,
    *,
    threads: int | None = None,
    device: str | None = None,
    ray_address: str | None = None,
    ray_resources: dict[str, float] | None = None,
) -> JobRunner:
    if name == "subprocess":
        return SubprocessRunner(threads=threads, device=device)
    if name == "in_process":
        return InProcessRunner()
    from vllm_lora_ext.jobs.ray_runner import RayRunner

    return RayRunner(address=ray_address, threads=threads, resources=ray_resources or {})
