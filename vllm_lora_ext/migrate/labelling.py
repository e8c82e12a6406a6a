"""Step 3: the teacher (old base + old adapter) answers every kept input.

Free-form answers are generated greedily; where an input comes with answer options, the teacher
picks the option it finds most likely (log-likelihood of each option's tokens, the way
multiple-choice tasks are scored), so its label is always a valid option. The answers are text,
not token ids, so a student with another tokenizer can learn them. Inputs go to the backend in
chunks, so a cancelled job stops between chunks, not after all of them.

A free-form label can also be voted on: the teacher answers ``votes`` more times by sampling,
and the answer most of its answers agree on is kept (self-consistency); an input the teacher
does not agree with itself on is dropped, since a label the teacher is unsure of is more often
wrong. An answer that ran into the token budget is recorded as truncated and cut where the
task's answers end (as many lines as the known answers have). A multiple-choice label carries
the probability the teacher gives its option among the listed ones: its doubt, as disagreeing
votes are for free-form answers.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.bbh import OPTIONS_HEADER, MalformedTask
from vllm_lora_ext.evaluation.bbh import parse_options as parse_bbh_options
from vllm_lora_ext.evaluation.prompts import answer_ids, stop_token_ids
from vllm_lora_ext.evaluation.scoring import choose_option, option_probabilities
from vllm_lora_ext.migrate.queries import query_prompt, read_answer


class LabellingStopped(RuntimeError):
    """``should_stop`` ended labelling between two chunks."""


@dataclass(frozen=True)
class Label:
    text: str | None
    """The label, or ``None``: no options to choose from, or no majority among the votes."""
    agreement: float = 1.0
    """How sure the teacher is of ``text``: the share of its answers (greedy + sampled) equal to
    it (1 without votes), or for multiple choice the probability it gives that option among
    the listed ones."""
    truncated: bool = False
    """The kept answer ran into the token budget (then it was cut, see :func:`cut_answer`)."""
    options: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    """Multiple choice: every option the input lists and the teacher's probability for each
    (what a student learns from when it draws its labels, :func:`soft_draws`)."""


@dataclass(frozen=True)
class VoteParams:
    votes: int = 0
    """Sampled answers besides the greedy one; 0: the greedy answer is the label."""
    temperature: float = 0.7
    min_agreement: float = 0.5
    """Share of all ``votes + 1`` answers the majority needs, else the input is dropped."""
    seed: int = 0


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
    answers = _answers(backend, inputs, max_tokens, 0.0, None, chunk, on_chunk, should_stop)
    return [text for text, _ in answers]


def _answers(
    backend: Backend,
    inputs: Sequence[str],
    max_tokens: int,
    temperature: float,
    seed: int | None,
    chunk: int,
    on_chunk: Callable[[int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> list[tuple[str, bool]]:
    """(answer, ran into ``max_tokens``) per input; sampled with ``seed + index`` if seeded."""
    tok = backend.tokenizer
    stops = stop_token_ids(tok)
    answers: list[tuple[str, bool]] = []
    for start in range(0, len(inputs), chunk):
        if should_stop is not None and should_stop():
            raise LabellingStopped(f"stopped after {len(answers)} of {len(inputs)} answers")
        prompts = [query_prompt(tok, x) for x in inputs[start : start + chunk]]
        at = None if seed is None else seed + start
        gens = backend.generate([p.ids for p in prompts], max_tokens, stops, temperature, at)
        answers += [
            (read_answer(g.text, p), len(g.token_ids) >= max_tokens)
            for g, p in zip(gens, prompts, strict=True)
        ]
        if on_chunk is not None:
            on_chunk(len(answers))
    return answers


def answer_key(text: str) -> str:
    """What two answers must share to count as the same vote: case, spacing and trailing
    punctuation aside."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".!").strip().casefold()


def answer_lines(known: Sequence[str]) -> int | None:
    """How many lines the task's answers have (the most among known answers), if any are known."""
    return max((len(k.strip().splitlines()) or 1 for k in known), default=None)


def cut_answer(text: str, truncated: bool, max_lines: int | None) -> str | None:
    """A truncated answer cut where the task's answer ends: its first ``max_lines`` lines, or
    without known answers all but its last, unfinished line (``None`` if nothing is left). An
    answer the model ended itself is kept whole."""
    if not truncated:
        return text.strip() or None
    lines = text.strip().splitlines()
    keep = lines[:max_lines] if max_lines is not None else lines[:-1]
    return "\n".join(keep).strip() or None


def vote_all(
    backend: Backend,
    inputs: Sequence[str],
    max_tokens: int,
    params: VoteParams,
    max_lines: int | None = None,
    chunk: int = 32,
    on_chunk: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Label]:
    """The majority of the teacher's greedy and ``params.votes`` sampled answers per input."""
    greedy_progress = on_chunk if params.votes == 0 else None
    rounds = [_answers(backend, inputs, max_tokens, 0.0, None, chunk, greedy_progress, should_stop)]
    for r in range(params.votes):
        seed = params.seed + (r + 1) * len(inputs)
        temperature = params.temperature
        rounds.append(
            _answers(backend, inputs, max_tokens, temperature, seed, chunk, None, should_stop)
        )
        if on_chunk is not None:
            on_chunk(round(len(inputs) * (r + 1) / params.votes))
    labels = []
    for i in range(len(inputs)):
        answers = [(cut_answer(a, t, max_lines), t) for a, t in (rnd[i] for rnd in rounds)]
        counts = Counter(answer_key(a) for a, _ in answers if a is not None)
        if not counts:
            labels.append(Label(None, 0.0, answers[0][1]))
            continue
        key, n = counts.most_common(1)[0]
        agreement = n / len(rounds)
        # The greedy answer's wording when it is in the majority, else the first that is.
        text, truncated = next((a, t) for a, t in answers if a and answer_key(a) == key)
        keep = params.votes == 0 or agreement >= params.min_agreement
        labels.append(Label(text if keep else None, agreement, truncated))
    return labels


def choose_all(
    backend: Backend, inputs: Sequence[str], options: Sequence[Sequence[str]]
) -> list[int]:
    """Index of the option the backend finds most likely for each input (framed by
    :func:`query_prompt`, options scored as continuations of the answer cue)."""
    return [c for c, _ in choose_all_with_confidence(backend, inputs, options)]


def choose_all_with_confidence(
    backend: Backend, inputs: Sequence[str], options: Sequence[Sequence[str]]
) -> list[tuple[int, float]]:
    """:func:`choose_all`, with the probability the backend gives its choice among the options
    (see :func:`~vllm_lora_ext.evaluation.scoring.option_probabilities`)."""
    return [(c, p[c]) for c, p in _scored_options(backend, inputs, options)]


def option_distributions(
    backend: Backend, inputs: Sequence[str], options: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Each input's probability over its options (summing to 1): what a student distils when
    it learns how sure the teacher is, not only which option it picks."""
    return [p for _, p in _scored_options(backend, inputs, options)]


def _scored_options(
    backend: Backend, inputs: Sequence[str], options: Sequence[Sequence[str]]
) -> list[tuple[int, list[float]]]:
    tok = backend.tokenizer
    requests, counts = [], []
    for text, opts in zip(inputs, options, strict=True):
        if not opts:
            raise ValueError(f"no options for input {text[:60]!r}")
        prompt = query_prompt(tok, text)
        requests += [(prompt.ids, answer_ids(tok, prompt, o)) for o in opts]
        counts.append(len(opts))
    logprobs = backend.continuation_logprobs(requests)
    scored, at = [], 0
    for n in counts:
        part = logprobs[at : at + n]
        scored.append((choose_option(part), option_probabilities(part)))
        at += n
    return scored


def parse_options(text: str, choice_prefix: str) -> list[str]:
    """The options an input lists: what follows each ``choice_prefix``, up to the line's end;
    with BBH's ``"\nOptions:\n"`` block (:data:`~vllm_lora_ext.evaluation.bbh.OPTIONS_HEADER`),
    the answers it lists (``(A)`` for a line ``(A) text``, ``Yes`` for ``- Yes``), none when
    the block is malformed."""
    if choice_prefix == OPTIONS_HEADER:
        try:
            return list(parse_bbh_options(text))
        except MalformedTask:
            return []
    parts = text.split(choice_prefix)[1:]
    return [o for p in parts if (o := p.split("\n", 1)[0].strip())]


def lists_options(options: Sequence[str]) -> bool:
    """Whether an input's options give the teacher a choice (two or more): else it has no label,
    and synthesis drops it before any filter sees it."""
    return len(options) >= 2


def label_all(
    backend: Backend,
    inputs: Sequence[str],
    max_tokens: int = 64,
    choice_prefix: str | None = None,
    votes: VoteParams | None = None,
    max_lines: int | None = None,
    chunk: int = 32,
    on_chunk: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Label]:
    """The teacher's label for each input: its (voted) answer, or with ``choice_prefix`` the
    option it finds most likely (``None`` for an input that lists fewer than two options),
    never dropped for doubt: the caller decides what a multiple-choice label's confidence
    must be."""
    if choice_prefix is None:
        return vote_all(backend, inputs, max_tokens, votes or VoteParams(), max_lines, chunk,
                        on_chunk, should_stop)  # fmt: skip
    labels: list[Label] = []
    for start in range(0, len(inputs), chunk):
        if should_stop is not None and should_stop():
            raise LabellingStopped(f"stopped after {len(labels)} of {len(inputs)} labels")
        part = inputs[start : start + chunk]
        options = [parse_options(x, choice_prefix) for x in part]
        ok = [i for i, o in enumerate(options) if lists_options(o)]
        scored = (
            _scored_options(backend, [part[i] for i in ok], [options[i] for i in ok]) if ok else []
        )
        picked = [Label(None, 0.0)] * len(part)
        for i, (c, p) in zip(ok, scored, strict=True):
            picked[i] = Label(options[i][c], p[c], options=tuple(options[i]),
                              probabilities=tuple(p))  # fmt: skip
        labels += picked
        if on_chunk is not None:
            on_chunk(len(labels))
    return labels


def soft_draws(label: Label, draws: int, rng: random.Random) -> list[str]:
    """``draws`` options drawn from the teacher's probabilities over an input's options: trained
    on all of them, a student learns the teacher's distribution in expectation (the cross-entropy
    to it), not its argmax alone, and needs no shared tokenizer."""
    if not label.options:
        raise ValueError("soft draws need a multiple-choice label with its options")
    return rng.choices(list(label.options), weights=list(label.probabilities), k=draws)
