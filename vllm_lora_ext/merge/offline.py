"""Offline merge of PEFT adapter folders into a new folder, with a recipe that says how.

Backs ``vllm-lora-ext merge``. The result appears atomically: it is written into a staging
directory beside the target and renamed into place, so a crash never leaves a half-written
adapter under the final name. ``recipe.json`` records the method, the validated parameters and
each source with its weights' sha256, so a merge can be audited and (with a DARE seed) redone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_lora_ext.adapters.lora_weights import load_lora, save_lora
from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, PeftLoraConfig
from vllm_lora_ext.adapters.recipe import RECIPE_FILE, RECIPE_FORMAT, RECIPE_VERSION
from vllm_lora_ext.adapters.validation import validate_name
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.files import sha256_file
from vllm_lora_ext.merge.methods import merge_adapters, validate_params
from vllm_lora_ext.merge.params import MergeParams


def common_base(paths: Sequence[Path]) -> str:
    """The ``base_model_name_or_path`` all adapters name; ValueError if any differs or is unset."""
    bases = {}
    for path in paths:
        config = PeftLoraConfig.model_validate_json((path / CONFIG_FILE).read_text())
        if not config.base_model_name_or_path:
            raise ValueError(f"{path}: adapter_config.json does not name its base model")
        bases[str(path)] = config.base_model_name_or_path
    if len(set(bases.values())) != 1:
        listing = ", ".join(f"{p} -> {b}" for p, b in bases.items())
        raise ValueError(f"adapters were trained on different base models: {listing}")
    return next(iter(bases.values()))


def merge_folders(
    paths: Sequence[Path],
    weights: Sequence[float],
    method: str,
    params: Mapping[str, Any] | MergeParams | None,
    out_dir: Path,
    name: str,
    generator: torch.Generator | None = None,
) -> Path:
    """Merge the adapters in ``paths`` into ``out_dir/name``; returns that path.

    Refuses (ValueError) adapters of different bases, bad parameters, an invalid name or an
    existing target; nothing is left behind on failure.
    """
    try:
        validate_name(name)
    except Refused as e:
        raise ValueError(e.message) from None
    paths = [Path(p) for p in paths]
    if not paths or len(paths) != len(weights):
        raise ValueError("need at least one adapter folder and exactly one weight per folder")
    checked = validate_params(method, params)
    base = common_base(paths)
    out_dir = Path(out_dir)
    target = out_dir / name
    if target.exists():
        raise ValueError(f"{target} already exists")
    sources = [
        {"path": str(p.resolve()), "weight": float(w), "sha256": sha256_file(p / WEIGHTS_FILE)}
        for p, w in zip(paths, weights, strict=True)
    ]
    merged = merge_adapters([load_lora(p) for p in paths], weights, method, checked, generator)
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "method": method,
        "params": checked.model_dump(),
        "rank": merged.rank,
        "base_model_name_or_path": base,
        "sources": sources,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=out_dir))
    try:
        save_lora(merged, staging, base)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        if target.exists():  # rename() would silently replace an empty directory
            raise ValueError(f"{target} already exists")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
