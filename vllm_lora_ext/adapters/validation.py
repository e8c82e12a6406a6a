"""Refuse an adapter before it reaches the store or vLLM, with a reason an operator can act on.

Every check here runs on files in a staging directory; nothing is written to the store until all
of them pass. Reasons are a closed set so they can label a Prometheus counter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.peft_format import (
    ALLOWED_FILES,
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    PeftLoraConfig,
    parse_key,
)
from vllm_lora_ext.errors import Refused

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterSummary(BaseModel):
    """What validation learned about an adapter; stored as its lineage record."""

    rank: int
    lora_alpha: float
    target_modules: list[str]
    declared_base: str | None
    size_bytes: int


def validate_name(name: str, reserved: Iterable[str] = ()) -> str:
    """Names become directory names and model ids: a conservative charset, no ``..``."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise Refused(
            "invalid_name",
            f"invalid adapter name {name!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'",
        )
    if name in set(reserved):
        raise Refused("invalid_name", f"adapter name {name!r} is the base model's name")
    return name


def check_file_name(name: str) -> None:
    """Refuse pickles (they run code when loaded) and files PEFT adapters do not carry."""
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise Refused(
            "pickle_file",
            f"{name!r} is a pickle checkpoint, which can run code when loaded; "
            f"convert it to {WEIGHTS_FILE}",
        )
    if name not in ALLOWED_FILES:
        raise Refused(
            "unexpected_file",
            f"unexpected file {name!r}; allowed: {', '.join(sorted(ALLOWED_FILES))}",
        )


def check_allowed_path(path: Path, roots: Iterable[Path], kind: str = "directory") -> Path:
    """``path`` with symlinks resolved, if it lies under one of ``roots`` (already resolved);
    refused otherwise. No roots: registration by server path is off."""
    roots = list(roots)
    if not roots:
        raise Refused(
            "path_not_allowed",
            "registration from a server path is off on this server: upload the files "
            "(multipart POST /v1/adapters), or start it with --allowed-adapter-path DIR",
            403,
        )
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused("missing_file", f"{str(path)!r} does not exist") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise Refused(
            "path_not_allowed",
            f"the {kind} {str(path)!r} is outside the allowed adapter paths "
            f"({', '.join(map(str, roots))})",
            403,
        )
    return resolved


def check_file_names(names: Iterable[str]) -> None:
    """Every name acceptable, and the two PEFT files present."""
    names = list(names)
    for n in names:
        check_file_name(n)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in names:
            raise Refused("missing_file", f"missing {required}")


def read_config(path: Path) -> PeftLoraConfig:
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("the top level must be a JSON object")
        return PeftLoraConfig.model_validate(raw)
    except (ValueError, ValidationError, UnicodeDecodeError) as e:
        raise Refused("malformed_config", f"{CONFIG_FILE} is not valid: {e}") from e


def inspect_adapter_dir(directory: Path, base: BaseModelInfo, max_rank: int) -> AdapterSummary:
    """Validate a PEFT LoRA directory against ``base``; raise Refused on the first fault."""
    check_file_names(p.name for p in directory.iterdir())
    config = read_config(directory / CONFIG_FILE)
    if unsupported := config.unsupported_features():
        raise Refused(
            "malformed_config", f"vLLM cannot serve adapters with {', '.join(unsupported)}"
        )
    if not base.accepts_declared_base(config.base_model_name_or_path):
        raise Refused(
            "wrong_base",
            f"adapter was trained on {config.base_model_name_or_path!r}; this server serves "
            f"{base.name!r} (known as {sorted(base.aliases)})",
        )
    if config.declared_rank > max_rank:
        raise Refused(
            "rank_too_high",
            f"{CONFIG_FILE} declares rank {config.declared_rank}; the server's max is {max_rank}",
        )
    factors = _read_factors(directory / WEIGHTS_FILE)
    modules: set[str] = set()
    ranks: set[int] = set()
    for (layer, module), pair in sorted(factors.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise Refused("malformed_weights", f"{where}: lora_A and lora_B must pair")
        if module not in base.module_shapes:
            raise Refused(
                "unsupported_module",
                f"{where}: module {module!r} is not one of {sorted(base.module_shapes)}",
            )
        if layer >= base.num_layers:
            raise Refused("shape_mismatch", f"{where}: the base has only {base.num_layers} layers")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = base.module_shapes[module]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, rank):
            raise Refused(
                "shape_mismatch",
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"base, which needs [r, {fan_in}] / [{fan_out}, r]",
            )
        if rank > max_rank:
            raise Refused(
                "rank_too_high", f"{where}: rank {rank} exceeds the server's max {max_rank}"
            )
        if not config.rank_pattern and rank != config.r:
            # vLLM scales by the config's r, not the tensors': the adapter would load and
            # silently compute something else.
            raise Refused(
                "malformed_config",
                f"{where}: rank {rank}, but {CONFIG_FILE} says r={config.r} (and no rank_pattern)",
            )
        for name, t in (("lora_A", a), ("lora_B", b)):
            if not t.dtype.is_floating_point:
                raise Refused("malformed_weights", f"{where}: {name} is {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise Refused("non_finite", f"{where}: {name} holds NaN or Inf")
        # vLLM multiplies the scaling into lora_B at load: it must stay finite there too.
        largest = float(b.abs().max()) * config.scaling(rank) if b.numel() else 0.0
        if not largest <= torch.finfo(b.dtype).max:
            raise Refused(
                "non_finite",
                f"{where}: lora_B x lora_alpha/r overflows {b.dtype} (largest {largest:.3g})",
            )
        modules.add(module)
        ranks.add(rank)
    if not factors:
        raise Refused("malformed_weights", f"{WEIGHTS_FILE} holds no LoRA factors")
    return AdapterSummary(
        rank=max(ranks),
        lora_alpha=config.lora_alpha,
        target_modules=sorted(modules),
        declared_base=config.base_model_name_or_path,
        size_bytes=sum(p.stat().st_size for p in directory.iterdir()),
    )


def _read_factors(path: Path) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                parsed = parse_key(key)
                if parsed is None:
                    raise Refused(
                        "unsupported_module", f"tensor {key!r} is not a LoRA factor we serve"
                    )
                layer, module, factor = parsed
                factors.setdefault((layer, module), {})[factor] = f.get_tensor(key)
    except SafetensorError as e:
        raise Refused("malformed_weights", f"{WEIGHTS_FILE} is unreadable: {e}") from e
    return factors
