"""Step 2: a LoRA on the old base that tells real task inputs from the base model's own text.

It is trained to answer "yes" to "<x>\\nIs the above question from <task>?" for real inputs
(seeds and reservoir prompts) and "no" for what the old base writes with no task framing at all;
a synthetic input is kept when log p(yes) > log p(no). That drops generations that drifted away
from the task (the failure mode of unfiltered synthesis) at the price of a short training run on
a model that is already loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.prompts import Prompt, answer_ids, has_chat_template, message_prompt
from vllm_lora_ext.evaluation.prompts import stop_token_ids as default_stops
from vllm_lora_ext.migrate.synthesis import dedupe_key
from vllm_lora_ext.training import (
    LoraHyperparameters,
    Row,
    attach_lora,
    save_adapter_atomically,
    train_lora,
)

YES, NO = "yes", "no"
_SENTINEL = "\x00MIGRATE\x00"


def discriminator_prompt(tokenizer: Any, description: str, text: str) -> Prompt:
    question = f"{text.strip()}\nIs the above question from {description}?"
    if has_chat_template(tokenizer):
        return message_prompt(tokenizer, question)
    return message_prompt(tokenizer, f"{question}\nA:")


def discriminator_rows(
    tokenizer: Any,
    description: str,
    positives: Sequence[str],
    negatives: Sequence[str],
    max_len: int = 256,
) -> list[Row]:
    """Training rows, the smaller class repeated to the size of the larger so that the loss
    does not simply learn the class prior; rows longer than ``max_len`` are dropped."""
    if not positives or not negatives:
        raise ValueError(
            f"the discriminator needs both classes: {len(positives)} real inputs, "
            f"{len(negatives)} generated ones"
        )
    size = max(len(positives), len(negatives))
    rows: list[Row] = []
    for texts, label in ((positives, YES), (negatives, NO)):
        for i in range(size):
            prompt = discriminator_prompt(tokenizer, description, texts[i % len(texts)])
            ids = [*prompt.ids, *answer_ids(tokenizer, prompt, label)]
            if len(ids) <= max_len:
                rows.append((ids, len(prompt.ids)))
    return rows


def free_prompt(tokenizer: Any) -> tuple[int, ...]:
    """A prompt with no task in it: the opening of a user turn (the model writes what a user
    might ask), or just BOS for a model without a chat template."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": _SENTINEL}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        opening = text[: text.index(_SENTINEL)]
        return tuple(tokenizer(opening, add_special_tokens=False)["input_ids"])
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return tuple(ids) if ids else (tokenizer.eos_token_id,)


def sample_negatives(
    generator: Backend,
    count: int,
    seed: int,
    max_tokens: int = 64,
    exclude: Sequence[str] = (),
    max_attempts: int | None = None,
) -> list[str]:
    """Up to ``count`` distinct, non-empty texts the old base writes from :func:`free_prompt`."""
    tok = generator.tokenizer
    prompt = free_prompt(tok)
    seen = {dedupe_key(x) for x in exclude}
    out: list[str] = []
    attempts = 0
    limit = max_attempts if max_attempts is not None else 4 * count
    while len(out) < count and attempts < limit:
        size = min(count - len(out), limit - attempts)
        gens = generator.generate(
            [prompt] * size, max_tokens, default_stops(tok), temperature=1.0, seed=seed + attempts
        )
        attempts += size
        for g in gens:
            text = g.text.strip()
            if text and dedupe_key(text) not in seen:
                seen.add(dedupe_key(text))
                out.append(text)
    return out


def train_discriminator(
    base_dir: Path,
    description: str,
    positives: Sequence[str],
    negatives: Sequence[str],
    hp: LoraHyperparameters,
    out_dir: Path,
    max_len: int = 256,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[float]:
    """Train the yes/no LoRA on the old base (float32, in process) and save it to ``out_dir``
    atomically; returns the loss per step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = discriminator_rows(tokenizer, description, positives, negatives, max_len)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = attach_lora(base, hp)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses = train_lora(model, rows, hp, pad, on_step=on_step, should_stop=should_stop)
    save_adapter_atomically(model, out_dir)
    return losses


def discriminator_margins(backend: Backend, description: str, texts: Sequence[str]) -> list[float]:
    """log p(yes) - log p(no) per text, from a backend serving the trained discriminator."""
    tok = backend.tokenizer
    requests = []
    for text in texts:
        prompt = discriminator_prompt(tok, description, text)
        requests += [
            (prompt.ids, answer_ids(tok, prompt, YES)),
            (prompt.ids, answer_ids(tok, prompt, NO)),
        ]
    logprobs = backend.continuation_logprobs(requests)
    return [sum(logprobs[2 * i]) - sum(logprobs[2 * i + 1]) for i in range(len(texts))]


class DiscriminatorFilter:
    """An ``accept`` callback for synthesis: keep a text when p(yes) > p(no). Every margin it
    computed is kept in ``scores`` (text -> log p(yes) - log p(no)), for the audit."""

    def __init__(self, backend: Backend, description: str) -> None:
        self.backend, self.description = backend, description
        self.scores: dict[str, float] = {}

    def __call__(self, texts: list[str]) -> list[bool]:
        margins = discriminator_margins(self.backend, self.description, texts)
        self.scores.update(zip(texts, margins, strict=True))
        return [m > 0 for m in margins]


def discriminator_filter(backend: Backend, description: str) -> DiscriminatorFilter:
    return DiscriminatorFilter(backend, description)
