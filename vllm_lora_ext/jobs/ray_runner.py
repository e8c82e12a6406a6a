"""Jobs on a Ray cluster (``--job-runner ray --ray-address ...``), for training beside serving
on other GPUs or machines.

The job is the same :func:`~vllm_lora_ext.jobs.kinds.execute` on the same folder, submitted as
a Ray task with its resource request. The folder must be on a path every Ray worker mounts at
the same place (the adapter store: migrations keep their work under ``<store>/.migrations``);
progress and results travel through it, secrets as the task's arguments. Ray is imported only
here, and only when this runner is chosen (``pip install 'vllm-lora-ext[ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.kinds import JobCancelled, stops_at_checks
from vllm_lora_ext.jobs.runners import CANCEL_GRACE_SECONDS, RunnerName, outcome

CANCEL_MARKER = "cancel"
"""Written into the job folder to ask a Ray task to stop at its next check."""
_INIT = threading.Lock()


def _run_on_worker(path: str, secrets: dict[str, str], threads: int | None) -> dict[str, Any]:
    """The Ray task: the job in this worker. A cancel is a marker file in the shared folder
    (the job stops at its next check, as a child does on SIGTERM), then Ray's forced cancel."""
    import threading

    import torch

    from vllm_lora_ext.jobs.kinds import JobContext, execute

    if threads is not None:
        torch.set_num_threads(threads)
    context = JobContext(JobFolder(Path(path)), secrets=secrets)
    done = threading.Event()

    def watch_for_cancel() -> None:
        while not done.wait(0.5):
            if (context.folder.path / CANCEL_MARKER).exists():
                context.stop.set()
                return

    threading.Thread(target=watch_for_cancel, name="cancel-watch", daemon=True).start()
    try:
        return execute(context)
    finally:
        done.set()


@dataclass
class RayRunner:
    address: str | None = None
    """A running cluster (``ray://host:10001`` or ``host:6379``); None: ``RAY_ADDRESS`` or
    a local one Ray starts itself."""
    threads: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    """The task's request: ``num_cpus`` (default 1), ``num_gpus``, ``memory`` (bytes)."""
    name: RunnerName = "ray"

    async def start(self, folder: JobFolder, secrets: dict[str, str]) -> RayJob:
        import ray

        await asyncio.to_thread(self._connect)
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0} | self.resources
        threads = self.threads or max(1, int(options["num_cpus"]))
        task = ray.remote(_run_on_worker).options(**options)
        (folder.path / CANCEL_MARKER).unlink(missing_ok=True)
        ref = task.remote(str(folder.path), secrets, threads)
        return RayJob(folder, ref)

    def _connect(self) -> None:
        import ray

        with _INIT:  # two jobs starting at once must not both initialise
            if not ray.is_initialized():
                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)


@dataclass
class RayJob:
    folder: JobFolder
    ref: Any
    cancelled: bool = False

    @property
    def where(self) -> str:
        return f"ray task {self.ref.task_id().hex()}"

    def progress(self) -> dict[str, Any] | None:
        return self.folder.read_progress()

    def cancel(self) -> None:
        """Ask the task to stop at its next check (it checkpoints first), or interrupt a kind
        that never checks; force it after ``CANCEL_GRACE_SECONDS``."""
        import ray

        if self.cancelled:
            return
        self.cancelled = True
        if stops_at_checks(self.folder):
            (self.folder.path / CANCEL_MARKER).touch()
        else:  # a job that never checks is interrupted now
            ray.cancel(self.ref)
        asyncio.get_running_loop().call_later(CANCEL_GRACE_SECONDS, self._force)

    def _force(self) -> None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            ray.cancel(self.ref, force=True)

    async def result(self) -> dict[str, Any]:
        import ray

        try:
            return await self.ref
        except (ray.exceptions.TaskCancelledError, JobCancelled) as e:
            raise JobCancelled("cancelled") from e
        except Exception as e:
            if self.cancelled:
                raise JobCancelled("cancelled") from e
            crashed = f"the Ray task failed: {type(e).__name__}: {str(e)[-2000:]}"
            return outcome(self.folder, crashed)


@contextlib.contextmanager
def local_head(num_cpus: int = 2, timeout: float = 180.0) -> Iterator[str]:
    """A Ray head on 127.0.0.1 for one machine (the tests, the benchmarks, a single box), its
    address while the block runs. It is this process's own: stopped with its process group
    afterwards, never with ``ray stop``, which would stop every Ray on the machine. Its files
    live in a short folder under /tmp (Ray's socket paths must fit in 107 bytes), removed
    after."""
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp:
        yield from _head(Path(temp), num_cpus, timeout)


def _head(temp_dir: Path, num_cpus: int, timeout: float) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]  # fmt: skip
    temp_dir.mkdir(parents=True, exist_ok=True)
    with (temp_dir / "head.log").open("wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while subprocess.run([ray, "status", f"--address={address}"], env=env,
                             capture_output=True, check=False).returncode != 0:  # fmt: skip
            if head.poll() is not None or time.monotonic() > deadline:
                tail = (temp_dir / "head.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the Ray head did not start:\n{tail}")
            time.sleep(1.0)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # and whatever of its group outlived it
        head.wait()
