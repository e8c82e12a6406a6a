"""Step 3: the teacher (old base + old adapter) answers every kept input, greedily.

The answers are text, not token ids, so a student with another tokenizer can learn them. Inputs
go to the backend in chunks, so a cancelled job stops between chunks, not after all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.prompts import stop_token_ids
from vllm_lora_ext.migrate.queries import query_prompt, read_answer


class LabellingStopped(RuntimeError):
    """``should_stop`` ended labelling between two chunks."""


def answer_all(
    backend: Backend,
    inputs: Sequence[str],
    max_tokens: int = 64,
    chunk: int = 32,
    on_chunk: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """The backend's greedy answer to each input (framed by :func:`query_prompt`).

    ``on_chunk(done)`` reports how many are answered so far. Used for the teacher's labels and
    for the student's answers at the gate, so both are read back the same way.
    """
    tok = backend.tokenizer
    stops = stop_token_ids(tok)
    answers: list[str] = []
    for start in range(0, len(inputs), chunk):
        if should_stop is not None and should_stop():
            raise LabellingStopped(f"stopped after {len(answers)} of {len(inputs)} answers")
        prompts = [query_prompt(tok, x) for x in inputs[start : start + chunk]]
        gens = backend.generate([p.ids for p in prompts], max_tokens, stops)
        answers += [read_answer(g.text, p) for g, p in zip(gens, prompts, strict=True)]
        if on_chunk is not None:
            on_chunk(len(answers))
    return answers
