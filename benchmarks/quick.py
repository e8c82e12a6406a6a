"""What every benchmark's ``--quick`` shares: a scratch output folder, and the offline stand-ins
for what a fresh machine lacks (the real models, the trained adapters, the BIG-bench tasks).

A quick run is a smoke run: the benchmark's own code path end to end with tiny counts, on the
tiny test models of ``tests/tiny_model.py`` (built in seconds) and a small synthetic task cache,
so it needs nothing beyond ``make setup``. Its numbers mean nothing; its JSON says
``"quick": true`` and is written under the temporary directory unless ``--out`` says otherwise,
never over the committed ``benchmarks/results/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tiny_model  # noqa: E402  (tests/tiny_model.py: the suite's own offline models)

NOTE = "quick smoke run: tiny model, synthetic tasks, tiny counts; the numbers mean nothing"


def out_dir(name: str) -> Path:
    """A quick run's default output folder: ``<tmp>/<name>_quick``."""
    return Path(tempfile.gettempdir()) / f"{name}_quick"


def isolate(work: Path) -> Path:
    """Point the package's cache (``VLLM_LORA_EXT_CACHE_DIR``: tasks, converted models, job
    folders) at ``work/cache`` for this process and the servers it starts, and write the
    synthetic tasks there; the user's real cache is neither read nor written."""
    cache = work / "cache"
    os.environ["VLLM_LORA_EXT_CACHE_DIR"] = str(cache)
    write_tasks(cache / "tasks")
    return cache


def tiny_llama(work: Path) -> Path:
    """The suite's tiny Llama (ChatML chat template) in ``work/tiny-llama``."""
    return tiny_model.build_tiny_llama(work / "tiny-llama")


def tiny_gemma3(work: Path) -> Path:
    """The suite's tiny Gemma 3 (another tokenizer, no chat template) in ``work/tiny-gemma3``."""
    return tiny_model.build_tiny_gemma3(work / "tiny-gemma3")


def tiny_serve_args(model_dir: Path) -> list[str]:
    return tiny_model.tiny_serve_args(model_dir)


def random_adapter(
    out: Path,
    model_dir: Path,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    card: dict | None = None,
) -> Path:
    """A random LoRA for the tiny Llama in PEFT format, with ``card.json`` when given."""
    tensors = tiny_model.random_lora_tensors(seed, rank=rank, targets=targets)
    tiny_model.write_adapter(out, tensors, str(model_dir), rank=rank, alpha=2.0 * rank,
                             targets=targets)  # fmt: skip
    if card is not None:
        (out / "card.json").write_text(json.dumps(card, indent=2))
    return out


# -- synthetic BBH tasks ------------------------------------------------------------------------

_WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "rocket",
          "garden", "pencil", "violin"]  # fmt: skip
_FREE_FORM = ("object_counting", "multistep_arithmetic_two", "word_sorting", "dyck_languages")
_CLOSED_PAIR = ("boolean_expressions", "sports_understanding", "web_of_lies")
_LISTED = ("causal_judgement",)


def _task_json(task: str) -> dict:
    """A small BBH file in the real task's answer format: free form (a count), a closed pair
    (yes/no with no options listed), listed options (``- Yes``) or lettered ones (``(A)``)."""
    examples = []
    for i in range(40):
        word, other = _WORDS[i % len(_WORDS)], _WORDS[(i * 5 + 1) % len(_WORDS)]
        question = f"{task.replace('_', ' ')} {i}: {word} and {other}?"
        if task in _FREE_FORM:
            examples.append({"input": question + " How many?", "target": str(i % 7 + 1)})
        elif task in _CLOSED_PAIR:
            examples.append({"input": question, "target": ("yes", "no")[i % 2]})
        elif task in _LISTED:
            examples.append({"input": question + "\nOptions:\n- Yes\n- No",
                             "target": ("Yes", "No")[i % 2]})  # fmt: skip
        else:
            answers = (word, other, "both")
            options = "".join(f"\n({c}) {w}" for c, w in zip("ABC", answers, strict=True))
            examples.append({"input": question + "\nOptions:" + options,
                             "target": f"({'ABC'[i % 3]})"})  # fmt: skip
    return {"canary": "synthetic (benchmarks/quick.py)", "examples": examples}


def write_tasks(dest: Path) -> Path:
    """Every BBH task of ``task_cache.BBH_SHA256`` as a small synthetic file, with the manifest
    ``load_task`` checks: the real loader reads them unchanged (arithmetic is generated)."""
    from vllm_lora_ext.evaluation.task_cache import BBH_SHA256, MANIFEST, task_file
    from vllm_lora_ext.files import write_atomic

    checksums = {}
    for task in sorted(BBH_SHA256):
        data = json.dumps(_task_json(task), indent=1).encode()
        write_atomic(dest / task_file(task), data)
        checksums[task_file(task)] = hashlib.sha256(data).hexdigest()
    manifest = {"source": "synthetic (benchmarks/quick.py)", "files": checksums}
    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=1).encode())
    return dest
