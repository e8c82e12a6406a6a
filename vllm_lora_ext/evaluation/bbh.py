"""The answer formats of BIG-Bench Hard, read from the task files themselves.

BBH writes every example as ``{"input", "target"}``. Three shapes occur:

- lettered options, ``Options:`` then lines ``(A) text``; the target is the label ``(A)``;
- listed options, ``Options:`` then lines ``- Yes``; the target is the option's text (``No``);
- no options: a free-form target (a number, a word list), or one of a closed pair of answers
  that the input implies (``True``/``False``, ``yes``/``no``).

The first two and the closed pair are scored as multiple choice over those answer strings; free
forms by exact match of the generated answer.
"""

from __future__ import annotations

import re

OPTIONS_HEADER = "\nOptions:\n"
"""What introduces an input's options; also the ``choice_prefix`` a migration of a BBH task with
listed options is given (:func:`vllm_lora_ext.migrate.labelling.parse_options`)."""
_LETTERED = re.compile(r"(\([A-Z]\))(?: .*)?")
_LISTED = re.compile(r"- (\S.*)")


class MalformedTask(ValueError):
    """A task file whose examples do not fit one of the BBH answer formats."""


def parse_options(text: str) -> tuple[str, ...]:
    """The answers an input lists after its last ``Options:`` line: the labels (``"(A)"``) of
    lettered options, the texts of ``- `` options; ``()`` when it lists none.

    Raises :class:`MalformedTask` when the block mixes the two styles, holds another line, or
    repeats an answer: a scorer that guessed there would score the wrong strings.
    """
    _, header, block = text.rpartition(OPTIONS_HEADER)
    if not header:
        return ()
    lines = block.rstrip("\n").split("\n")
    for pattern in (_LETTERED, _LISTED):
        matches = [pattern.fullmatch(line) for line in lines]
        if all(matches):
            answers = tuple(m.group(1).strip() for m in matches if m)
            if len(set(answers)) != len(answers):
                raise MalformedTask(f"repeated options in {block!r}")
            return answers
    raise MalformedTask(f"options neither all '(X) text' nor all '- text': {block!r}")


def options_block_end(text: str) -> int | None:
    """Where the first options block of a text ends: just after its last option line, the block
    being ``Options:`` then two or more distinct options of one style; ``None`` without one.

    An input ends with its options, but a small generator asked for a new one seldom stops
    there (it goes on with an answer, or the next example): a synthesis with
    ``synthesis_ends_at_options`` cuts it here.
    """
    start = text.find(OPTIONS_HEADER)
    if start < 0:
        return None
    at = start + len(OPTIONS_HEADER)
    for pattern in (_LETTERED, _LISTED):
        end, seen = at, set()
        for line in text[at:].split("\n"):
            match = pattern.fullmatch(line)
            if match is None or match.group(1).strip() in seen:
                break
            seen.add(match.group(1).strip())
            end += len(line) + 1
        if len(seen) >= 2:
            return end - 1
    return None


def answer_sets(inputs: list[str], targets: list[str]) -> list[tuple[str, ...]]:
    """The options of each example: those its input lists; else, when no input lists any and
    the task's targets take exactly two values, that closed pair (sorted); else ``()``
    (free form). An example whose target is not among its options is the file's own error
    (two in ruin_names): :func:`scorable` tells the loader to drop it."""
    listed = [parse_options(text) for text in inputs]
    if any(listed) and not all(listed):
        raise MalformedTask("some inputs list options and others do not")
    if not any(listed):
        answers = sorted(set(targets))
        pair = tuple(answers) if len(answers) == 2 else ()
        listed = [pair] * len(inputs)
    return listed


def scorable(options: tuple[str, ...], target: str) -> bool:
    """Whether an example can be scored: free form, or its target is one of its options."""
    return not options or target in options
