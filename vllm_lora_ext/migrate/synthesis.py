"""Step 1: the old base model writes new task inputs, few-shot, from real ones.

The generator sees "Here are N examples of <task>: 1. ... N. ... N+1." and its sampled
continuation, cut where it starts item N+2, is one new input. Each prompt shows a fresh random
subset and order of the real inputs, so the outputs vary even with few of them. Outputs that are
empty, cut off by the token budget, or already seen (real or generated) are dropped before any
filter sees them: duplicates would weigh a few inputs many times in distillation.

Inputs that share a frame (the same first and last lines in every real input: a task's
instructions and answer cue, as in BIG-bench's multiple-choice tasks) are shown without it and
the frame is put back around each new one (:func:`input_frame`): the generator then writes only
what varies, which is shorter, so fewer outputs run into the token budget, and a new input
cannot get the instructions wrong.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.prompts import Prompt, has_chat_template, message_prompt
from vllm_lora_ext.evaluation.prompts import stop_token_ids as default_stops

_SPACES = re.compile(r"\s+")

# Called with the new candidates of one round; says which to keep (e.g. the discriminator).
Accept = Callable[[list[str]], list[bool]]
# Whether one candidate is in the task's input format; one that is not is dropped as unparsable
# before any filter sees it (a filter's yes on it would buy an input nobody can label).
WellFormed = Callable[[str], bool]
# Where a complete input ends in a generation (None: nowhere yet), e.g. after a multiple-choice
# input's options block: what the generator wrote after it is not part of the input.
InputEnd = Callable[[str], int | None]


@dataclass
class SynthesisCounts:
    generated: int = 0
    """Generations asked for (the attempts)."""
    unparsable: int = 0
    """Empty, cut off by ``max_tokens`` before the item ended, or not in the task's input format
    (``well_formed``: e.g. a multiple-choice input without two options)."""
    duplicates: int = 0
    rejected: int = 0
    """Refused by ``accept``."""
    kept: int = 0


@dataclass
class Synthesis:
    inputs: list[str] = field(default_factory=list)
    counts: SynthesisCounts = field(default_factory=SynthesisCounts)
    candidates: list[tuple[str, bool]] = field(default_factory=list)
    """Every candidate the filter saw, kept or not: a filter that cannot be audited cannot be
    trusted (the job writes them, with the filter's scores, beside its checkpoints)."""


def generator_prompt(tokenizer: Any, description: str, examples: Sequence[str]) -> Prompt:
    """The numbered few-shot list, ending with ``N+1.`` where the new input starts.

    With a chat template the list is the user turn and ``N+1.`` opens the assistant's answer;
    without one it is plain text for the model to continue.
    """
    n = len(examples)
    listing = "".join(f"{i}. {x.strip()}\n" for i, x in enumerate(examples, 1))
    header = f"Here are {n} examples of {description}:\n"
    if has_chat_template(tokenizer):
        ask = f"{header}{listing}Write example {n + 1}, in the same format."
        base = message_prompt(tokenizer, ask)
        opening = tokenizer(f"{n + 1}.", add_special_tokens=False)["input_ids"]
        return Prompt((*base.ids, *opening), answer_prefix=" ")
    ids = tokenizer(f"{header}{listing}{n + 1}.", add_special_tokens=True)["input_ids"]
    return Prompt(tuple(ids), answer_prefix=" ")


def parse_generated(
    text: str, n: int, truncated: bool, single_line: bool, input_end: InputEnd | None = None
) -> str | None:
    """The new input in a continuation of item ``n + 1``, or ``None`` if there is none.

    The item ends where item ``n + 2`` starts, at the first newline when every example was one
    line, where ``input_end`` says the task's format ends (when the generation was cut off, the
    text after it must show the end: a complete line, or a line that cannot be another option),
    or where the generation stopped by itself; a generation cut off by the token budget with no
    such end is an unfinished input and is dropped.
    """
    ended = not truncated
    marker = re.search(rf"\n\s*{n + 2}\s*[.)]", text)
    if marker:
        text, ended = text[: marker.start()], True
    if single_line and "\n" in text.strip():
        text, ended = text.strip().split("\n", 1)[0], True
    end = input_end(text) if input_end is not None else None
    if end is not None and (ended or _closed(text[end + 1 :])):
        text, ended = text[:end], True
    text = text.strip()
    return text if text and ended else None


def _closed(after: str) -> bool:
    """Whether the text after an input's last line shows that line was the last: a complete
    line follows, or a started one that is no option (``(C`` or ``- `` may be one)."""
    return "\n" in after or (after.strip() != "" and not after.lstrip().startswith(("(", "-")))


@dataclass(frozen=True)
class Frame:
    """The lines every real input starts (``head``) and ends (``tail``) with."""

    head: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()

    def strip(self, text: str) -> str:
        lines = text.strip().split("\n")
        return "\n".join(lines[len(self.head) : len(lines) - len(self.tail)])

    def wrap(self, body: str) -> str:
        return "\n".join([*self.head, body, *self.tail])


def input_frame(examples: Sequence[str]) -> Frame:
    """The longest run of first lines and of last lines shared by every example, leaving each
    example at least one line of its own; no frame for fewer than two examples."""
    if len(examples) < 2:
        return Frame()
    lines = [x.strip().split("\n") for x in examples]
    shortest = min(len(x) for x in lines)
    head = 0
    while head < shortest - 1 and len({x[head] for x in lines}) == 1:
        head += 1
    tail = 0
    while head + tail < shortest - 1 and len({x[-1 - tail] for x in lines}) == 1:
        tail += 1
    return Frame(tuple(lines[0][:head]), tuple(lines[0][len(lines[0]) - tail :]))


def dedupe_key(text: str) -> str:
    """Case- and whitespace-insensitive identity of an input."""
    return _SPACES.sub(" ", text.strip().lower())


def _hopeless(counts: SynthesisCounts, count: int, max_attempts: int) -> bool:
    """At the rate seen so far, would the whole budget yield fewer well-formed inputs than
    ``count``?"""
    well_formed = counts.generated - counts.unparsable
    return well_formed * max_attempts < count * counts.generated


def synthesise(
    generator: Backend,
    description: str,
    examples: Sequence[str],
    count: int,
    max_attempts: int,
    seed: int,
    shots: int = 4,
    batch: int = 16,
    max_tokens: int = 64,
    temperature: float = 1.0,
    frame: bool = False,
    well_formed: WellFormed | None = None,
    input_end: InputEnd | None = None,
    accept: Accept | None = None,
    on_round: Callable[[SynthesisCounts], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    give_up_after: int = 0,
) -> Synthesis:
    """Sample new inputs until ``count`` are kept or ``max_attempts`` generations were made.

    The last round's extra accepted inputs are kept too (they are paid for), so ``kept`` may
    exceed ``count`` by less than ``batch``; ``generated`` = unparsable + duplicates + rejected +
    kept always holds.
    ``accept`` filters each round's new candidates (rejection sampling); ``should_stop`` is
    checked before each round and ends the loop early (the caller decides what that means).
    With ``frame`` the examples' shared first and last lines are left out of the prompts and
    put back around each new input (:func:`input_frame`). ``well_formed`` drops candidates
    not in the task's input format as unparsable; ``input_end`` cuts a generation where the
    task's input format ends (:func:`parse_generated`). ``give_up_after`` (0: never) ends the loop
    once that many generations were made and the share in the task's format, over the whole
    budget, could not reach ``count`` even if the filter kept every one (none parsable is the
    plain case; 1 in 64 is as hopeless, and costs the whole budget otherwise).
    """
    if not examples:
        raise ValueError("synthesis needs at least one real example input")
    rng = random.Random(seed)
    tok = generator.tokenizer
    seen = {dedupe_key(x) for x in examples}
    shared = input_frame(examples) if frame else Frame()
    examples = [shared.strip(x) for x in examples]
    single_line = all("\n" not in x.strip() for x in examples)
    out = Synthesis()
    counts = out.counts
    stops = default_stops(tok)
    while counts.kept < count and counts.generated < max_attempts:
        if should_stop is not None and should_stop():
            break
        if 0 < give_up_after <= counts.generated and _hopeless(counts, count, max_attempts):
            break
        size = min(batch, max_attempts - counts.generated)
        shown = [rng.sample(list(examples), min(shots, len(examples))) for _ in range(size)]
        prompts = [generator_prompt(tok, description, s).ids for s in shown]
        # Backends sample prompt i with seed + i: offsetting by the prompts so far gives every
        # prompt of the job its own seed.
        gens = generator.generate(
            prompts,
            max_tokens,
            stops,
            temperature=temperature,
            seed=seed * 1_000_003 + counts.generated,
        )
        counts.generated += size
        candidates: list[str] = []
        for s, g in zip(shown, gens, strict=True):
            truncated = len(g.token_ids) >= max_tokens
            text = parse_generated(g.text, len(s), truncated, single_line, input_end)
            text = shared.wrap(text) if text is not None else None
            if text is not None and well_formed is not None and not well_formed(text):
                text = None
            if text is None:
                counts.unparsable += 1
            elif dedupe_key(text) in seen:
                counts.duplicates += 1
            else:
                seen.add(dedupe_key(text))
                candidates.append(text)
        keep = accept(candidates) if accept is not None and candidates else [True] * len(candidates)
        for text, ok in zip(candidates, keep, strict=True):
            out.candidates.append((text, bool(ok)))
            if ok:
                out.inputs.append(text)
            counts.kept += ok
            counts.rejected += not ok
        if on_round is not None:
            on_round(counts)
    return out
