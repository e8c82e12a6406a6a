"""Step 4: a new LoRA on the new base learns the teacher's answers.

Sequence level (any two tokenizers): cross-entropy on the teacher's answer *text* re-tokenised
by the new base's tokenizer, followed by its end-of-answer token, so the student also learns
where to stop (SmolLM2 -> Gemma 3). Token level (the same tokenizer only): at each of those
tokens, KL to the teacher's top-k next-token distribution, which a served teacher returns as
prompt log-probs; the student then learns how sure the teacher is, not only its argmax.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.migrate.queries import tokenizer_mismatch
from vllm_lora_ext.training import (
    LoraHyperparameters,
    attach_lora,
    kept_distillation_rows,
    save_adapter_atomically,
    train_lora,
)

CARD_FILE = "distillation.json"


@dataclass(frozen=True)
class Distillation:
    adapter_dir: Path
    losses: list[float]
    rows: int
    too_long: int
    """Pairs dropped because prompt + answer exceeded ``max_len`` tokens."""
    fit: list[tuple[int, float]]
    """(step, fraction of training rows the student answers exactly as labelled), as measured."""


def distil(
    base_dir: Path,
    pairs: Sequence[tuple[str, str]],
    hp: LoraHyperparameters,
    out_dir: Path,
    max_len: int = 256,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    teacher: Backend | None = None,
    top_k: int = 20,
    fit_target: float | None = None,
    fit_every: int = 10,
    weights: Sequence[float] | None = None,
) -> Distillation:
    """Train the student on the new base (float32, in process) and save it atomically as a
    PEFT directory at ``out_dir``. A NaN/inf loss raises ``TrainingDiverged`` before saving.

    With ``teacher`` (a backend with the new base's tokenizer) the loss is token-level KL to
    its top-``top_k`` distributions over each row's answer tokens; a teacher with another
    tokenizer raises ``ValueError`` before any work. With ``fit_target`` training ends once
    the student's greedy answer equals the label on that fraction of rows (checked every
    ``fit_every`` steps), or when ``hp.steps`` run out. ``weights`` (one per pair) weight each
    row's loss (``train_lora``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if teacher is not None and (why := tokenizer_mismatch(teacher.tokenizer, tokenizer)):
        raise ValueError(f"token-level distillation needs the teacher's tokenizer: {why}")
    if weights is not None and len(weights) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(weights)} weights")
    rows, kept = kept_distillation_rows(tokenizer, pairs, max_len)
    too_long = len(pairs) - len(rows)
    if weights is not None:
        weights = [weights[i] for i in kept]  # those of the pairs that fit in max_len
    if not rows:
        raise ValueError(f"all {len(pairs)} pairs are longer than max_len={max_len} tokens")
    distributions = None
    if teacher is not None:
        requests = [(ids[:start], ids[start:]) for ids, start in rows]
        distributions = teacher.continuation_top_logprobs(requests, top_k)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = attach_lora(base, hp)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fit: list[tuple[int, float]] = []
    losses = train_lora(
        model, rows, hp, pad, on_step=on_step, should_stop=should_stop, teacher=distributions,
        fit_target=fit_target, fit_every=fit_every, on_fit=lambda *f: fit.append(f),
        weights=weights,
    )  # fmt: skip
    card = {
        "hyperparameters": asdict(hp),
        "rows": len(rows),
        "too_long": too_long,
        "loss": "token-level KL" if teacher is not None else "sequence-level cross-entropy",
        "steps_run": len(losses),
        "fit": fit,
    }
    card["final_loss"] = losses[-1]
    save_adapter_atomically(model, out_dir, {CARD_FILE: json.dumps(card, indent=2)})
    return Distillation(Path(out_dir), losses, len(rows), too_long, fit)
