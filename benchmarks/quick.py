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


# -- synthetic BIG-bench tasks -------------------------------------------------------------------

_WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "rocket",
          "garden", "pencil", "violin"]  # fmt: skip


def _task_json(rel: str) -> dict:
    """A small task file with the shape of the real one: ``exact_str_match`` arithmetic, the
    rest multiple choice with two or three options."""
    name, sub = rel.split("/")[0], rel.split("/")[1]
    if name == "arithmetic":
        sign = "-" if "subtraction" in sub else "+"
        examples = []
        tens = 10 if sub.startswith("2_digit") else 0  # other inputs than the 1-digit file
        for i in range(12):
            a, b = (i * 7) % 10 + 1 + tens, (i * 3) % 10 + tens // 2
            answer = a - b if sign == "-" else a + b
            examples.append({"input": f"What is {a} {sign} {b}?", "target": str(answer)})
        return {"name": sub, "preferred_score": "exact_str_match", "examples": examples}
    options = ["yes", "no"] if len(name) % 2 else ["(A)", "(B)", "(C)"]
    examples = []
    for i in range(40):
        word, other = _WORDS[i % len(_WORDS)], _WORDS[(i * 5 + 1) % len(_WORDS)]
        right = options[i % len(options)]
        examples.append({
            "input": f"{name.replace('_', ' ')} {i}: {word} and {other}?",
            "target_scores": {o: int(o == right) for o in options},
        })  # fmt: skip
    return {
        "name": name,
        "preferred_score": "multiple_choice_grade",
        "task_prefix": "Answer the question.\n",
        "examples": examples,
    }


def write_tasks(dest: Path) -> Path:
    """Every development task of ``task_cache.TASK_SOURCES`` as a synthetic ``task.json``, with
    the manifest ``load_task`` checks: the real loader reads them unchanged."""
    from vllm_lora_ext.evaluation.task_cache import MANIFEST, TASK_SOURCES
    from vllm_lora_ext.files import write_atomic

    checksums = {}
    for rel in sorted({r for files in TASK_SOURCES.values() for r in files}):
        data = json.dumps(_task_json(rel), indent=1).encode()
        write_atomic(dest / rel, data)
        checksums[rel] = hashlib.sha256(data).hexdigest()
    manifest = {"source": "synthetic (benchmarks/quick.py)", "files": checksums}
    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=1).encode())
    return dest
