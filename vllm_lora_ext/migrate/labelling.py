"""Step 3: the teacher (old base + old adapter) answers every kept input.

Free-form answers are generated greedily; where an input comes with answer options, the teacher
picks the option it finds most likely (log-likelihood of each option's tokens, the way
multiple-choice tasks are scored), so its label is always a valid option. The answers are text,
not token ids, so a student with another tokenizer can learn them. Inputs go to the backend in
chunks, so a cancelled job stops between chunks, not after all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.prompts import answer_ids, stop_token_ids
from vllm_lora_ext.evaluation.scoring import choose_option
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


def choose_all(
    backend: Backend, inputs: Sequence[str], options: Sequence[Sequence[str]]
) -> list[int]:
    """Index of the option the backend finds most likely for each input (framed by
    :func:`query_prompt`, options scored as continuations of the answer cue)."""
    tok = backend.tokenizer
    requests, counts = [], []
    for text, opts in zip(inputs, options, strict=True):
        if not opts:
            raise ValueError(f"no options for input {text[:60]!r}")
        prompt = query_prompt(tok, text)
        requests += [(prompt.ids, answer_ids(tok, prompt, o)) for o in opts]
        counts.append(len(opts))
    logprobs = backend.continuation_logprobs(requests)
    choices, at = [], 0
    for n in counts:
        choices.append(choose_option(logprobs[at : at + n]))
        at += n
    return choices


def parse_options(text: str, choice_prefix: str) -> list[str]:
    """The options an input lists: what follows each ``choice_prefix``, up to the line's end."""
    parts = text.split(choice_prefix)[1:]
    return [o for p in parts if (o := p.split("\n", 1)[0].strip())]


def label_all(
    backend: Backend,
    inputs: Sequence[str],
    max_tokens: int = 64,
    choice_prefix: str | None = None,
    chunk: int = 32,
    on_chunk: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str | None]:
    """The teacher's label for each input: its greedy answer, or with ``choice_prefix`` the
    option it finds most likely (``None`` for an input that lists fewer than two options)."""
    if choice_prefix is None:
        return list(answer_all(backend, inputs, max_tokens, chunk, on_chunk, should_stop))
    labels: list[str | None] = []
    for start in range(0, len(inputs), chunk):
        if should_stop is not None and should_stop():
            raise LabellingStopped(f"stopped after {len(labels)} of {len(inputs)} labels")
        part = inputs[start : start + chunk]
        options = [parse_options(x, choice_prefix) for x in part]
        ok = [i for i, o in enumerate(options) if len(o) >= 2]
        chosen = choose_all(backend, [part[i] for i in ok], [options[i] for i in ok]) if ok else []
        picked: list[str | None] = [None] * len(part)
        for i, c in zip(ok, chosen, strict=True):
            picked[i] = options[i][c]
        labels += picked
        if on_chunk is not None:
            on_chunk(len(labels))
    return labels
