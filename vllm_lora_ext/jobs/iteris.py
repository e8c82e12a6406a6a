"""The ``iteris_solve`` job: one IterIS step (:func:`~vllm_lora_ext.merge.iteris.iteris_merge`).

Inputs are files: the adapters in the store, the base model's safetensors, and the traffic
statistics the server saved for this step. The merged adapter is written to ``<job>/merged``.
The replays between steps need the serving engine and stay in the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_lora_ext.jobs.kinds import JobContext

MERGED_DIR = "merged"


def params(
    *,
    adapters: dict[str, Path],
    model_dir: Path,
    base_name: str,
    stats_file: Path,
    solver: dict[str, Any],
) -> dict[str, Any]:
    """``adapters``: name (as in the statistics) -> folder, in merge order."""
    return {
        "adapters": {name: str(path) for name, path in adapters.items()},
        "model_dir": str(model_dir),
        "base_name": base_name,
        "stats_file": str(stats_file),
        "solver": solver,
    }


def run(p: dict[str, Any], context: JobContext) -> dict[str, Any]:
    from vllm_lora_ext.adapters.lora_weights import load_lora, save_lora
    from vllm_lora_ext.merge.base_weights import read_base_weights
    from vllm_lora_ext.merge.iteris import IterisParams, iteris_merge
    from vllm_lora_ext.stats.accumulators import IterisStats

    context.report({"phase": "loading"}, force=True)
    names = list(p["adapters"])
    adapters = [load_lora(Path(p["adapters"][name])) for name in names]
    modules = sorted({m for a in adapters for m in a.modules()})
    base = read_base_weights(Path(p["model_dir"]), modules)
    stats = IterisStats.load(Path(p["stats_file"]))
    context.report({"phase": "solving"}, force=True)
    result = iteris_merge(adapters, names, base, stats, IterisParams.model_validate(p["solver"]))
    out = context.folder.path / MERGED_DIR
    save_lora(result.weights, out, base=p["base_name"])
    return {"adapter_dir": str(out), "errors": result.errors}
