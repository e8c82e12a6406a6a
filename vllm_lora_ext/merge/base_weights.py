"""A base model's own weights, read straight from its safetensors (IterIS needs ``W₀``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def read_base_weights(model_dir: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """``{module without the PEFT prefix: W₀ [out, in]}`` from ``model_dir/*.safetensors``."""
    wanted = {m.removeprefix("base_model.model.") + ".weight" for m in modules}
    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in wanted & set(f.keys()):
                found[key.removesuffix(".weight")] = f.get_tensor(key).float()
    missing = sorted(wanted - {k + ".weight" for k in found})
    if missing:
        raise KeyError(f"base weights not found in {model_dir}: {missing[:3]}")
    return found
