"""The PEFT LoRA on-disk format: file names, tensor keys and ``adapter_config.json``."""

from __future__ import annotations

import math
import re

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Files that may travel with an adapter; anything else is refused rather than silently dropped.
OPTIONAL_FILES = frozenset({"README.md", "card.json", "recipe.json", "distillation.json"})
ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE}) | OPTIONAL_FILES
# Pickle-based checkpoints execute code on load: never accepted.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY = re.compile(
    r"base_model\.model\.(?:model\.)?(?:language_model\.)?layers\.(?P<layer>[0-9]+)\."
    r"(?:self_attn|mlp)\.(?P<module>[a-z_]+)\.lora_(?P<factor>[AB])\.weight"
)
"""Matched whole (``fullmatch``; ``$`` would also match before a trailing newline, a key vLLM
refuses) with ASCII digits only (``\\d`` takes other scripts' digits, whose layer vLLM skips)."""


def parse_key(key: str) -> tuple[int, str, str] | None:
    """``(layer, module, "A"|"B")`` for a LoRA factor key of a decoder linear, else None."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    return int(m["layer"]), m["module"], m["factor"]


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """What PEFT and vLLM multiply ``B @ A`` by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def tensor_key(layer: int, module: str, factor: str) -> str:
    """Inverse of :func:`parse_key` for the Llama layout (what PEFT writes for these models)."""
    block = "self_attn" if module in {"q_proj", "k_proj", "v_proj", "o_proj"} else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{factor}.weight"


_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
"""``init_lora_weights`` values that only set the starting weights (a saved adapter is a plain
LoRA); others (PiSSA, OLoRA, LoftQ, ...) change the base model's weights."""


class PeftLoraConfig(BaseModel):
    """The fields of ``adapter_config.json`` we rely on; the rest is kept as written."""

    model_config = ConfigDict(extra="allow")

    peft_type: str
    # Strict types: vLLM reads the file as written, so a value pydantic would convert ("5" for
    # 5, "0" for False) passes here and fails there, or silently changes the scaling there.
    r: StrictInt = Field(gt=0)
    lora_alpha: StrictInt | StrictFloat
    target_modules: list[str] | str
    base_model_name_or_path: str | None = None
    use_dora: StrictBool = False
    use_rslora: StrictBool = False
    rank_pattern: dict[str, StrictInt] = Field(default_factory=dict)
    alpha_pattern: dict[str, StrictInt | StrictFloat] = Field(default_factory=dict)

    @field_validator("lora_alpha")
    @classmethod
    def _positive_finite(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {value!r}")
        return value

    @property
    def declared_rank(self) -> int:
        """The largest rank the config declares: what vLLM checks against --max-lora-rank."""
        return max([self.r, *self.rank_pattern.values()])

    def scaling(self, rank: int) -> float:
        """The factor vLLM multiplies into lora_B for a module of ``rank``."""
        return lora_scaling(self.lora_alpha, rank, self.use_rslora)

    def unsupported_features(self) -> list[str]:
        """What vLLM 0.32 refuses to load (its ``PEFTHelper.validate_legal``), found here so
        such an adapter never reaches the engine; a fuzz run found ``bias`` slipping through."""
        extra = self.model_extra or {}
        init = extra.get("init_lora_weights", True)
        found = {
            "DoRA (use_dora)": self.use_dora,
            f"bias={extra.get('bias')!r} (only 'none')": extra.get("bias", "none") != "none",
            "LoRA bias (lora_bias)": bool(extra.get("lora_bias")),
            "modules_to_save": bool(extra.get("modules_to_save")),
            f"init_lora_weights={init!r} (it changes the base weights)": isinstance(init, str)
            and init.lower() not in _PLAIN_INITS,
            "Activated LoRA (alora_invocation_tokens)": bool(extra.get("alora_invocation_tokens")),
            "layer_replication": bool(extra.get("layer_replication")),
            "block-diagonal LoRA (use_bdlora)": bool(extra.get("use_bdlora")),
            "QALoRA (use_qalora)": bool(extra.get("use_qalora")),
        }
        return [name for name, present in found.items() if present]

    @field_validator("peft_type")
    @classmethod
    def _must_be_lora(cls, value: str) -> str:
        if value.upper() != "LORA":
            raise ValueError(f"peft_type must be 'LORA', got {value!r}")
        return value
