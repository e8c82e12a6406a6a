"""Heavy jobs out of process (``vllm_lora_ext.jobs``): the folder, the child's command line, and
each runner's outcomes on a real job kind (an IterIS solve of two random adapters of the tiny
Llama): a result equal to the solve called directly, a failure with its reason, a kill -9 and
a cancel reported as such, and a cancelled caller that takes its child with it. On a real
local Ray head: the same solve gives the child's adapter, and failures and cancels read alike."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import build_tiny_llama, module_shapes, random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.lora_weights import load_lora
from vllm_lora_ext.jobs import iteris as iteris_job
from vllm_lora_ext.jobs.folder import JobFolder
from vllm_lora_ext.jobs.kinds import JobCancelled
from vllm_lora_ext.jobs.ray_runner import RayRunner
from vllm_lora_ext.jobs.runners import (
    InProcessRunner,
    JobFailed,
    JobRunner,
    SubprocessRunner,
    run_to_end,
)
from vllm_lora_ext.merge.base_weights import read_base_weights
from vllm_lora_ext.merge.iteris import IterisParams, iteris_merge
from vllm_lora_ext.stats.accumulators import IterisStats, input_key

T = TypeVar("T")
NAMES = ("a", "b")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(scope="module")
def solve_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama, two random adapters and traffic statistics of random inputs."""
    root = tmp_path_factory.mktemp("iteris-job")
    model = build_tiny_llama(root / "model")
    adapters = {
        name: write_adapter(root / name, random_lora_tensors(seed), base="tiny")
        for seed, name in enumerate(NAMES)
    }
    g = torch.Generator().manual_seed(7)
    stats = IterisStats()
    shapes = module_shapes()
    for name in NAMES:
        for module in load_lora(adapters[name]).modules():
            fan_in = shapes[module.rsplit(".", 1)[-1]][0]
            stats.add(name, input_key(module), torch.randn(40, fan_in, generator=g))
    stats_file = root / "stats.safetensors"
    stats.save(stats_file)
    solver = IterisParams(rank=8).model_dump(mode="json")
    spec = iteris_job.params(
        adapters=adapters, model_dir=model, base_name="tiny", stats_file=stats_file, solver=solver
    )
    return {"spec": spec, "adapters": adapters, "model": model, "stats": stats}


def direct_solve(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The oracle: the same solve called in this process, no job."""
    adapters = [load_lora(inputs["adapters"][n]) for n in NAMES]
    modules = sorted({m for a in adapters for m in a.modules()})
    base = read_base_weights(inputs["model"], modules)
    return iteris_merge(
        adapters, list(NAMES), base, inputs["stats"], IterisParams(rank=8)
    ).weights.tensors


@pytest.mark.parametrize("runner", [SubprocessRunner(threads=1), InProcessRunner()],
                         ids=["subprocess", "in_process"])  # fmt: skip
def test_a_job_gives_what_the_direct_call_gives(
    tmp_path: Path, solve_inputs: dict[str, Any], runner: JobRunner
) -> None:
    seen: list[dict[str, Any]] = []
    folder = JobFolder(tmp_path / "job")
    result = run(run_to_end(runner, folder, "iteris_solve", solve_inputs["spec"],
                            on_progress=seen.append))  # fmt: skip
    merged = load_lora(Path(result["adapter_dir"])).tensors
    want = direct_solve(solve_inputs)
    assert merged.keys() == want.keys()
    for key, tensor in want.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6)
    assert folder.read_result() == result and folder.read_error() is None
    assert all(p["phase"] in ("loading", "solving") for p in seen)


@pytest.mark.parametrize("runner", [SubprocessRunner(), InProcessRunner()],
                         ids=["subprocess", "in_process"])  # fmt: skip
def test_a_failing_job_fails_with_its_reason(
    tmp_path: Path, solve_inputs: dict[str, Any], runner: JobRunner
) -> None:
    spec = solve_inputs["spec"] | {"stats_file": str(tmp_path / "missing.safetensors")}
    folder = JobFolder(tmp_path / "job")
    with pytest.raises(JobFailed, match=r"missing\.safetensors"):
        run(run_to_end(runner, folder, "iteris_solve", spec))
    assert folder.read_error()["kind"] == "failed" and folder.read_result() is None


def test_an_unknown_kind_fails_the_job(tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match="unknown job kind 'nope'"):
        run(run_to_end(SubprocessRunner(), JobFolder(tmp_path / "job"), "nope", {}))


def test_a_killed_child_fails_the_job_with_the_signal(
    tmp_path: Path, solve_inputs: dict[str, Any]
) -> None:
    """kill -9 (what the kernel's out-of-memory killer sends): failed, saying so; never a hang."""

    async def scenario() -> None:
        folder = JobFolder(tmp_path / "job").write_spec("iteris_solve", solve_inputs["spec"])
        job = await SubprocessRunner().start(folder, {})
        os.kill(job.pid, signal.SIGKILL)
        with pytest.raises(JobFailed, match="killed by SIGKILL"):
            await job.result()

    run(scenario())


def test_cancel_ends_the_child_cancelled(tmp_path: Path, solve_inputs: dict[str, Any]) -> None:
    async def scenario() -> None:
        folder = JobFolder(tmp_path / "job").write_spec("iteris_solve", solve_inputs["spec"])
        job = await SubprocessRunner().start(folder, {})
        job.cancel()
        with pytest.raises(JobCancelled):
            await job.result()
        assert job.process.returncode is not None

    run(scenario())


def test_a_cancelled_caller_takes_its_child_with_it(
    tmp_path: Path, solve_inputs: dict[str, Any]
) -> None:
    """The merge job's task cancelled (twice) while its solve runs: the child has ended before
    the caller sees the cancel, so the caller may remove the job's folder."""
    started: list[Any] = []

    class Recording(SubprocessRunner):
        async def start(self, folder: JobFolder, secrets: dict[str, str]) -> Any:
            job = await super().start(folder, secrets)
            started.append(job)
            return job

    async def scenario() -> None:
        folder = JobFolder(tmp_path / "job")
        task = asyncio.create_task(run_to_end(Recording(), folder, "iteris_solve",
                                              solve_inputs["spec"]))  # fmt: skip
        while not started:
            await asyncio.sleep(0.01)
        task.cancel()
        for _ in range(3):  # the caller is cancelled again while it waits for the child
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert started[0].process.returncode is not None

    run(scenario())


def test_secrets_reach_the_child_but_never_its_folder(
    tmp_path: Path, solve_inputs: dict[str, Any]
) -> None:
    """The key is in the child's environment only: not in job.json, progress or stderr. The
    job's statistics file is a FIFO nobody writes, so the child waits on it, alive, while its
    environment is read; then it is killed."""

    async def scenario() -> None:
        fifo = tmp_path / "stats.fifo"
        os.mkfifo(fifo)
        spec = solve_inputs["spec"] | {"stats_file": str(fifo)}
        folder = JobFolder(tmp_path / "job").write_spec("iteris_solve", spec)
        job = await SubprocessRunner().start(folder, {"source": "s3cret"})
        environ = Path(f"/proc/{job.pid}/environ").read_bytes().split(b"\0")
        os.kill(job.pid, signal.SIGKILL)
        with pytest.raises(JobFailed):
            await job.result()
        assert b'VLLM_LORA_EXT_JOB_SECRETS={"source": "s3cret"}' in environ
        for path in folder.path.iterdir():
            assert "s3cret" not in path.read_text(errors="replace"), path

    run(scenario())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{tmp}/absent"], "holds no job.json"),
        (["run", "{tmp}/job", "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_the_job_command_refuses_bad_arguments(
    tmp_path: Path, args: list[str], message: str
) -> None:
    JobFolder(tmp_path / "job").write_spec("iteris_solve", {})
    cmd = [sys.executable, "-m", "vllm_lora_ext.jobs", *(a.format(tmp=tmp_path) for a in args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


VALUES = st.integers() | st.floats(allow_nan=False) | st.text()


@settings(max_examples=30, deadline=None)
@given(progress=st.dictionaries(st.text(min_size=1, max_size=8), VALUES))
def test_progress_reads_back_as_written(
    tmp_path_factory: pytest.TempPathFactory, progress: dict[str, Any]
) -> None:
    folder = JobFolder(tmp_path_factory.mktemp("p")).write_spec("iteris_solve", {})
    folder.write_progress(progress)
    assert folder.read_progress() == json.loads(json.dumps(progress))
    folder.write_spec("iteris_solve", {})  # a new run starts without the last one's files
    assert folder.read_progress() is None and folder.read_result() is None


# -- Ray: a real local head (conftest.ray_address); migrations on Ray: test_hot_upgrade.py


@pytest.mark.slow  # a Ray head takes ~20 s to start
def test_an_iteris_solve_on_ray_equals_the_child_process(
    tmp_path: Path,
    solve_inputs: dict[str, Any],
    ray_address: str,
) -> None:
    spec = solve_inputs["spec"]
    on_ray = run(run_to_end(RayRunner(ray_address, threads=1), JobFolder(tmp_path / "ray"),
                            "iteris_solve", spec))  # fmt: skip
    in_child = run(run_to_end(SubprocessRunner(threads=1), JobFolder(tmp_path / "child"),
                              "iteris_solve", spec))  # fmt: skip
    a = load_lora(Path(on_ray["adapter_dir"])).tensors
    b = load_lora(Path(in_child["adapter_dir"])).tensors
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_failing_job_on_ray_fails_with_its_reason(
    tmp_path: Path,
    solve_inputs: dict[str, Any],
    ray_address: str,
) -> None:
    spec = solve_inputs["spec"] | {"stats_file": str(tmp_path / "missing.safetensors")}
    with pytest.raises(JobFailed, match=r"missing\.safetensors"):
        run(run_to_end(RayRunner(ray_address), JobFolder(tmp_path / "job"), "iteris_solve", spec))


@pytest.mark.slow
def test_a_cancelled_job_on_ray_ends_cancelled(
    tmp_path: Path,
    solve_inputs: dict[str, Any],
    ray_address: str,
) -> None:
    async def scenario() -> None:
        folder = JobFolder(tmp_path / "job").write_spec("iteris_solve", solve_inputs["spec"])
        job = await RayRunner(ray_address).start(folder, {})
        job.cancel()
        with pytest.raises(JobCancelled):
            await job.result()

    run(scenario())
