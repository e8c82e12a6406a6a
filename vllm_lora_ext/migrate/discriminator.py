"""Step 2: a LoRA on the old base that tells real task inputs from the base model's own text.

It is trained to answer "yes" to "<x>\\nIs the above question from <task>?" for real inputs
(seeds and reservoir prompts) and "no" for what the old base writes with no task framing at all;
a synthetic input is kept when log p(yes) - log p(no) exceeds a threshold. That drops
generations that drifted away from the task (the failure mode of unfiltered synthesis) at the
price of a short training run on a model that is already loaded.

Trained on a few dozen texts it memorises them within a few dozen steps, and a threshold of 0
then says nothing about inputs it has not seen. With calibration a quarter of each class is
held out and the threshold is the one that separates the held-out classes best
(:class:`Calibration`); optionally training also stops when their loss stops falling (the best
weights are kept). On the tiny digits-vs-letters task of the unit tests early stopping halted
at the held-out loss minimum (step 15 of 100) and kept 79% task inputs instead of 100%: a
discriminator whose held-out loss rises from overconfidence can still rank well, so early
stopping is off unless asked for (``patience``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Calibration:
    """What the discriminator does on real and generated texts it was not trained on."""

    threshold: float
    """Keep a text when its margin (log p(yes) - log p(no)) is above this."""
    balanced_accuracy: float
    """Mean of the held-out positives kept and the held-out negatives rejected at it."""
    positives: list[float]
    negatives: list[float]
    """Held-out margins, per class."""
    best_step: int
    """The training step whose weights were kept (held-out loss lowest)."""
    checks: list[tuple[int, float]]
    """(step, held-out loss) at every check."""


def holdout_split(texts: Sequence[str], every: int = 4) -> tuple[list[str], list[str]]:
    """(train, held out): every ``every``-th text is held out, if that leaves two on each side."""
    held = list(texts[::every])
    train = [t for i, t in enumerate(texts) if i % every]
    if len(held) < 2 or len(train) < 2:
        return list(texts), []
    return train, held


def best_threshold(positives: Sequence[float], negatives: Sequence[float]) -> tuple[float, float]:
    """(threshold, balanced accuracy): the cut between sorted margins that best separates the
    classes (keep ``margin > threshold``). Few held-out texts make many cuts equally good: the
    middle of the lowest run of best cuts is taken, as far from both classes as they allow."""
    values = sorted({*positives, *negatives})
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(values)]

    def balanced(cut: float) -> float:
        kept = sum(m > cut for m in positives) / len(positives)
        return (kept + sum(m <= cut for m in negatives) / len(negatives)) / 2

    scores = [balanced(c) for c in cuts]
    best = max(scores)
    first = scores.index(best)
    last = first
    while last + 1 < len(cuts) and scores[last + 1] == best:
        last += 1
    return cuts[(first + last) // 2], best


def holdout_loss(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Mean logistic loss of the margins on the held-out texts (yes for real, no for generated)."""
    terms = [_softplus(-m) for m in positives] + [_softplus(m) for m in negatives]
    return sum(terms) / len(terms)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


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
    calibrate: bool = True,
    check_every: int = 5,
    patience: int = 0,
) -> tuple[list[float], Calibration | None]:
    """Train the yes/no LoRA on the old base (float32, in process) and save it to ``out_dir``
    atomically; returns the loss per step and, with ``calibrate`` (and enough texts to hold
    a quarter out), the :class:`Calibration`: every ``check_every`` steps the held-out loss is
    measured; with ``patience`` > 0 training ends after that many checks without improvement
    and the weights of the best check are saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_lora_ext.evaluation.backends import TransformersBackend

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pos_train, pos_held = holdout_split(positives) if calibrate else (list(positives), [])
    neg_train, neg_held = holdout_split(negatives) if calibrate else (list(negatives), [])
    rows = discriminator_rows(tokenizer, description, pos_train, neg_train, max_len)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = attach_lora(base, hp)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not (pos_held and neg_held):
        losses = train_lora(model, rows, hp, pad, on_step=on_step, should_stop=should_stop)
        save_adapter_atomically(model, out_dir)
        return losses, None

    backend = TransformersBackend(model, tokenizer)
    checks: list[tuple[int, float]] = []
    best: dict[str, Any] = {"loss": math.inf}

    def held_margins() -> tuple[list[float], list[float]]:
        margins = discriminator_margins(backend, description, [*pos_held, *neg_held])
        return margins[: len(pos_held)], margins[len(pos_held) :]

    def check(step: int) -> bool:
        if step % check_every and step != hp.steps:
            return False
        loss = holdout_loss(*held_margins())
        checks.append((step, loss))
        if loss < best["loss"]:
            trainable = {k: v.detach().clone() for k, v in model.named_parameters()
                         if v.requires_grad}  # fmt: skip
            best.update(loss=loss, step=step, weights=trainable)
        return patience > 0 and step - best["step"] >= patience * check_every

    losses = train_lora(
        model, rows, hp, pad, on_step=on_step, should_stop=should_stop, stop_when=check
    )
    if patience > 0:  # early stopping: back to the best check's weights
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in best["weights"].items():
                params[name].copy_(value)
    else:
        best["step"] = len(losses)
    pos, neg = held_margins()
    threshold, accuracy = best_threshold(pos, neg)
    save_adapter_atomically(model, out_dir)
    return losses, Calibration(threshold, accuracy, pos, neg, best["step"], checks)


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
    """An ``accept`` callback for synthesis: keep a text when its margin log p(yes) - log p(no)
    is above ``threshold`` (0: p(yes) > p(no)). Every margin it computed is kept in ``scores``
    (text -> margin), for the audit."""

    def __init__(self, backend: Backend, description: str, threshold: float = 0.0) -> None:
        self.backend, self.description, self.threshold = backend, description, threshold
        self.scores: dict[str, float] = {}

    def __call__(self, texts: list[str]) -> list[bool]:
        margins = discriminator_margins(self.backend, self.description, texts)
        self.scores.update(zip(texts, margins, strict=True))
        return [m > self.threshold for m in margins]


def discriminator_filter(
    backend: Backend, description: str, threshold: float = 0.0
) -> DiscriminatorFilter:
    return DiscriminatorFilter(backend, description, threshold)
