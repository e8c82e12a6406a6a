"""Backends in plain Python for the migration tests, and the data they use."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from vllm_lora_ext.evaluation.backends import Generation

DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def strings(rng: random.Random, alphabet: str, n: int) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def number_or_word(text: str) -> str:
    """The teacher's deterministic mapping in these tests."""
    return "number" if text[:1].isdigit() else "word"


class FunctionBackend:
    """A Backend whose generation is ``respond(prompt text, seed)``: a teacher that is a known
    function, or a generator with scripted outputs. Counts its calls."""

    def __init__(self, tokenizer, respond: Callable[[str, int], str]) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.calls = 0
        self.on_generate: Callable[[], None] | None = None

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        stop_token_ids: Sequence[int],
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        self.calls += 1
        if self.on_generate is not None:
            self.on_generate()
        out = []
        for i, prompt in enumerate(prompts):
            text = self.respond(self.tokenizer.decode(list(prompt)), (seed or 0) + i)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
            out.append(Generation(tuple(ids), self.tokenizer.decode(ids)))
        return out

    def continuation_logprobs(self, requests):
        raise NotImplementedError


def query_of(prompt_text: str) -> str:
    """The task input inside a ChatML query prompt (as built by ``query_prompt``)."""
    return prompt_text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
