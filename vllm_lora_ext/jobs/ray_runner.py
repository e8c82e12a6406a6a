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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.kinds import JobCancelled
from vllm_lora_ext.jobs.runners import RunnerName, outcome


def _run_on_worker(path: str, secrets: dict[str, str], threads: int | None) -> dict[str, Any]:
    """The Ray task: the job in this worker, its stop wired to Ray's cancel."""
    import torch

    from vllm_lora_ext.jobs.kinds import JobContext, execute

    if threads is not None:
        torch.set_num_threads(threads)
    context = JobContext(JobFolder(Path(path)), secrets=secrets)
    try:
        return execute(context)
    except KeyboardInterrupt as e:  # ray.cancel interrupts the task
        context.folder.write_error("cancelled", "cancelled through Ray")
        raise JobCancelled("cancelled through Ray") from e


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

        if not ray.is_initialized():
            await asyncio.to_thread(
                ray.init, address=self.address, ignore_reinit_error=True, log_to_driver=False
            )
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0} | self.resources
        threads = self.threads or max(1, int(options["num_cpus"]))
        task = ray.remote(_run_on_worker).options(**options)
        ref = task.remote(str(folder.path), secrets, threads)
        return RayJob(folder, ref)


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
        import ray

        if not self.cancelled:
            self.cancelled = True
            ray.cancel(self.ref)

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
