"""Settings shared by the CLI and every vLLM process, read from ``VLLM_LORA_EXT_*``.

The CLI writes them into the environment before it starts vLLM, so the API server process
(where the endpoint plugin runs) sees the same values the operator passed on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "vllm-lora-ext"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLLM_LORA_EXT_", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where converted base models live (never committed; SmolLM2 in fp32 is ~517 MB)."""

    store_dir: Path | None = None
    """Adapter store; defaults to ``<cache_dir>/adapters``."""

    base_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Extra names under which adapters may declare the served base (comma-separated)."""

    pinned_adapters: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Adapters loaded at start and never evicted from vLLM's CPU cache (comma-separated)."""

    max_upload_bytes: int = 1 << 30
    """Largest adapter accepted by ``POST /v1/adapters``."""

    allowed_adapter_paths: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Server directories under which ``POST /v1/adapters {"path"}`` may register adapters
    (comma-separated; symlinks resolved first). Empty: registration by path is refused, uploads
    still work (as vLLM's ``--allowed-local-media-path``, off by default)."""

    inline_merges: bool = True
    """Serve ``"model": "merge:a=0.5,b=0.5"`` requests (each distinct merge is built on disk)."""

    merged_cache_bytes: int = Field(default=1 << 30, ge=0)
    """Disk budget of the inline-merge cache (``<store>/.merged``), least recently used evicted
    first; the merge being served is always kept."""

    cpu_punica: Literal["ours", "vllm", "lora_kernels"] = "ours"
    """LoRA ops on CPU: our grouped matmuls, vLLM's per-token gather (the fallback), or our GPU
    path with its Triton kernels interpreted (tests only: slow)."""

    gpu_punica: Literal["ours", "vllm"] = "vllm"
    """LoRA ops on CUDA: vLLM's Triton ops (default, until ours are timed on a GPU) or ours."""

    stats_memory_bytes: int = 1 << 30
    """Budget for the traffic statistics held in the worker (``XᵀX`` per layer, float64)."""

    stats_dir: Path | None = None
    """Held traffic statistics; defaults to ``<store_dir>/.stats``. Replicas that share one
    store need their own (statistics are per replica, summed by ``stats gather``)."""

    stats_reservoir_size: int = 256
    """Prompts kept per captured adapter (a uniform sample): IterIS replays, pool merges, and the
    observed inputs a migration learns from. 256, not 64: a migrated arithmetic adapter scored
    0.27 held-out from 256 of them against 0.10 from 64
    (benchmarks/results/migration_quality_reservoir256.json, migration_quality_traffic64.json);
    IterIS replays at most ``prompts_per_adapter`` of them."""

    load_ahead: bool = True
    """Read an adapter missing from vLLM's CPU cache in the background when its request is
    admitted, so no engine step waits for the disk (off: vLLM loads it inside the step)."""

    metrics_top_adapters: int = Field(default=20, ge=0)
    """Adapters shown by name in the per-adapter metrics (most requests first); the rest are
    summed under ``other``, so ``/metrics`` stays small with thousands of adapters."""

    residency_poll_seconds: float = Field(default=2.0, gt=0)
    """How often the API server asks the worker where each adapter is (slot, CPU cache, disk)
    and for its load times."""

    migrate_from: str | None = None
    """``serve --migrate-from``: the old server whose adapters this one takes over at start."""

    migrate_source_model: Path | None = None
    """A local folder of the old server's base model (default: found if it is a known model)."""

    migrate_request: Path | None = None
    """A JSON file with the rest of the ``POST /v1/migrations`` body (tasks, seeds, options)."""

    job_runner: Literal["subprocess", "in_process", "ray"] = "subprocess"
    """Where heavy jobs (migration students, IterIS solves, pool merges) run: a child process
    per job (default), a Ray cluster, or a thread of the API server (only to measure what
    isolation buys: ``benchmarks/job_isolation.py``)."""

    job_threads: int | None = Field(default=1, ge=1)
    """Torch threads of a job. 1 by default, as jobs had in the API process: on a CPU server
    the engine's worker needs the other cores (BLAS threads spinning against it made an SVD
    90x slower). Raise it where the job has cores or a GPU of its own; None: torch's default
    in a child, ``ray_num_cpus`` on Ray."""

    job_device: str | None = None
    """``CUDA_VISIBLE_DEVICES`` of a child job (e.g. ``1``: train beside the serving GPU)."""

    ray_address: str | None = None
    """With ``job_runner=ray``: the cluster (None: ``RAY_ADDRESS``, else a local one)."""

    ray_num_cpus: float = Field(default=1.0, gt=0)
    ray_num_gpus: float = Field(default=0.0, ge=0)
    ray_memory_bytes: int | None = Field(default=None, gt=0)
    """A Ray job's resource request (memory: Ray's logical memory, for its scheduling)."""

    @field_validator("base_aliases", "pinned_adapters", "allowed_adapter_paths", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def job_runner_kwargs(self) -> dict[str, object]:
        """The arguments of :func:`vllm_lora_ext.jobs.runners.make_runner` these settings give."""
        resources: dict[str, float] = {"num_cpus": self.ray_num_cpus}
        if self.ray_num_gpus:
            resources["num_gpus"] = self.ray_num_gpus
        if self.ray_memory_bytes is not None:
            resources["memory"] = float(self.ray_memory_bytes)
        return {
            "threads": self.job_threads,
            "device": self.job_device,
            "ray_address": self.ray_address,
            "ray_resources": resources,
        }

    def resolved_store_dir(self) -> Path:
        return self.store_dir if self.store_dir is not None else self.cache_dir / "adapters"
