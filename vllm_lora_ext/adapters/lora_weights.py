"""A LoRA adapter as plain tensors: PEFT keys -> factors, plus the scale vLLM will apply."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_lora_ext.adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PeftLoraConfig,
    lora_scaling,
)


@dataclass
class LoraWeights:
    """``tensors`` in PEFT layout (``...lora_A.weight`` [r, in], ``...lora_B.weight`` [out, r])."""

    tensors: dict[str, torch.Tensor]
    rank: int
    lora_alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """What PEFT and vLLM multiply ``B @ A`` by."""
        return lora_scaling(self.lora_alpha, self.rank, self.use_rslora)

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``(B @ A) * scaling`` [out, in] of one module, in ``dtype``."""
        a = self.tensors[f"{module}.lora_A.weight"].to(dtype)
        b = self.tensors[f"{module}.lora_B.weight"].to(dtype)
        return (b @ a) * self.scaling

    def modules(self) -> list[str]:
        """Module prefixes (everything before ``.lora_A.weight``), sorted."""
        return sorted(k.removesuffix(".lora_A.weight") for k in self.tensors if ".lora_A." in k)


def load_lora(directory: Path) -> LoraWeights:
    config = PeftLoraConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    if config.rank_pattern:
        raise ValueError("adapters with a rank_pattern are not supported here")
    return LoraWeights(
        tensors=load_file(str(directory / WEIGHTS_FILE)),
        rank=config.r,
        lora_alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
    )


def save_lora(weights: LoraWeights, directory: Path, base: str | None) -> None:
    """Write a PEFT directory (into a fresh directory the caller renames into place)."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({m.rsplit(".", 1)[-1] for m in weights.modules()})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": weights.rank,
        "lora_alpha": weights.lora_alpha,
        "use_rslora": weights.use_rslora,
        "target_modules": targets,
        "base_model_name_or_path": base,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in weights.tensors.items()}, str(directory / WEIGHTS_FILE)
    )
