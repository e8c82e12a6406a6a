"""The ``pool_merge`` job: an adaptive or LoraHub merge from a pool, with its controls
(:func:`~vllm_lora_ext.merge.pool_merge.pool_merge`). The merged adapter goes to
``<job>/merged``; the report (selection, weights, controls, verdict) is the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_lora_ext.jobs.kinds import JobCancelled, JobContext

MERGED_DIR = "merged"
STOPS = True
"""Stops at its next check when asked (the Migrator's steps, the training loops)."""


def params(
    *,
    model_dir: Path,
    base_name: str,
    adapters: dict[str, Path],
    examples: list[tuple[str, str]],
    method: str,
    method_params: dict[str, Any],
) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir),
        "base_name": base_name,
        "adapters": {name: str(path) for name, path in adapters.items()},
        "examples": [list(e) for e in examples],
        "method": method,
        "method_params": method_params,
    }


def run(p: dict[str, Any], context: JobContext) -> dict[str, Any]:
    from vllm_lora_ext.adapters.lora_weights import load_lora, save_lora
    from vllm_lora_ext.merge.pool_merge import PARAMS, pool_merge
    from vllm_lora_ext.training import TrainingStopped

    def progress(phase: str, done: int, total: int) -> None:
        context.report({"phase": phase, "done": done, "total": total})

    context.report({"phase": "loading"}, force=True)
    adapters = {name: load_lora(Path(path)) for name, path in p["adapters"].items()}
    method = p["method"]
    try:
        result = pool_merge(
            Path(p["model_dir"]),
            adapters,
            [(i, o) for i, o in p["examples"]],
            method,
            PARAMS[method].model_validate(p["method_params"]),
            progress,
            context.stopping,
        )
    except TrainingStopped as e:
        raise JobCancelled(str(e)) from e
    out = context.folder.path / MERGED_DIR
    save_lora(result.merged, out, base=p["base_name"])
    return {
        "adapter_dir": str(out),
        "report": result.report(),
        "selected": result.selected,
        "controls": result.controls,
    }
