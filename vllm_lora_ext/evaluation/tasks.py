"""BIG-bench tasks as examples with seeded train / validation / held-out splits.

A task is scored the way its own ``task.json`` prefers: ``multiple_choice_grade`` by comparing
option log-likelihoods, ``exact_str_match`` by greedy generation. Splits are a seeded permutation
of the de-duplicated examples, and the seed and sizes travel with the :class:`Task`, so a number
reported later can be traced to exactly the examples it was measured on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vllm_lora_ext.evaluation.task_cache import TASK_SOURCES, read_task_file

Mode = Literal["multiple_choice", "generate"]
SPLITS = ("train", "validation", "heldout")
_MODES: dict[str, Mode] = {
    "multiple_choice_grade": "multiple_choice",
    "exact_str_match": "generate",
}


@dataclass(frozen=True)
class Example:
    input: str
    targets: tuple[str, ...]
    """Accepted answers: ``target`` of the file, else the options with the top score."""
    options: tuple[str, ...] = ()
    """Multiple-choice options (``target_scores`` keys), in a fixed per-example shuffled order."""
    scores: tuple[float, ...] = ()
    """``target_scores`` values aligned with ``options``."""
    subtask: str = ""

    @property
    def correct(self) -> tuple[int, ...]:
        """Indices of the options with the top score (several may tie)."""
        top = max(self.scores, default=None)
        return tuple(i for i, s in enumerate(self.scores) if s == top)


@dataclass(frozen=True)
class TaskFormat:
    """The prompt fields of a task.json; ``None`` prefixes mean "not declared by the task"."""

    task_prefix: str = ""
    input_prefix: str | None = None
    output_prefix: str | None = None
    choice_prefix: str = "\n  choice: "
    append_choices: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    mode: Mode
    format: TaskFormat
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    heldout: tuple[Example, ...]
    seed: int
    dropped: int
    """Examples removed before splitting: repeated inputs, and inputs with conflicting answers."""
    sources: dict[str, str] = field(default_factory=dict)
    """task.json path -> sha256, as verified when loaded."""

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}

    @property
    def examples(self) -> tuple[Example, ...]:
        return self.train + self.validation + self.heldout


def task_names() -> list[str]:
    return sorted(TASK_SOURCES)


def load_task(
    name: str,
    cache_dir: Path | None = None,
    seed: int = 0,
    validation: float | int = 0.1,
    heldout: float | int = 0.3,
    mode: Mode | None = None,
) -> Task:
    """Load a cached development task and split it.

    ``validation`` / ``heldout``: a fraction of the examples (float) or a count (int); the rest
    is ``train``. ``mode`` overrides the task's preferred scoring (e.g. arithmetic as
    multiple choice). Raises ValueError naming the valid tasks for an unknown ``name``.
    """
    if name not in TASK_SOURCES:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    loaded = {rel: read_task_file(rel, cache_dir) for rel in TASK_SOURCES[name]}
    raws = {rel: data for rel, (data, _) in loaded.items()}
    fmt, preferred = _format_and_mode(name, list(raws.values()))
    mode = mode or preferred
    examples: list[Example] = []
    for raw in raws.values():
        examples += [_parse_example(e, raw.get("name", name)) for e in raw["examples"]]
    kept = _deduplicate(examples)
    if mode == "multiple_choice" and not all(e.options for e in kept):
        raise ValueError(f"task {name!r} has examples without target_scores: not multiple choice")
    train, val, held = split_examples(kept, seed, validation, heldout)
    return Task(
        name,
        mode,
        fmt,
        train,
        val,
        held,
        seed=seed,
        dropped=len(examples) - len(kept),
        sources={rel: sha for rel, (_, sha) in loaded.items()},
    )


def split_examples(
    examples: list[Example], seed: int, validation: float | int, heldout: float | int
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    """(train, validation, heldout): a ``random.Random(seed)`` permutation cut into three."""
    n = len(examples)
    n_heldout, n_validation = _count(heldout, n), _count(validation, n)
    if n_heldout + n_validation > n:
        raise ValueError(f"held-out {n_heldout} + validation {n_validation} exceed {n} examples")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    picked = [examples[i] for i in order]
    cut = n_heldout + n_validation
    return tuple(picked[cut:]), tuple(picked[n_heldout:cut]), tuple(picked[:n_heldout])


def _count(size: float | int, n: int) -> int:
    if isinstance(size, bool) or size < 0:
        raise ValueError(f"a split size must be a non-negative count or fraction, got {size!r}")
    if isinstance(size, float):
        if size > 1:
            raise ValueError(f"a split fraction must be at most 1, got {size}")
        return round(size * n)
    return size


def _format_and_mode(name: str, raws: list[dict]) -> tuple[TaskFormat, Mode]:
    """The shared prompt format and preferred scoring of a task's files (they must agree)."""
    formats = {
        TaskFormat(
            task_prefix=raw.get("task_prefix", ""),
            input_prefix=raw.get("example_input_prefix"),
            output_prefix=raw.get("example_output_prefix"),
            choice_prefix=raw.get("choice_prefix", "\n  choice: "),
            append_choices=raw.get("append_choices_to_input", True),
        )
        for raw in raws
    }
    preferred = {raw.get("preferred_score", "multiple_choice_grade") for raw in raws}
    if len(formats) != 1 or len(preferred) != 1:
        raise ValueError(f"the files of task {name!r} disagree on format or scoring")
    score = preferred.pop()
    if score not in _MODES:
        raise ValueError(f"task {name!r} prefers {score!r}, which this harness does not score")
    return formats.pop(), _MODES[score]


def _parse_example(raw: dict, subtask: str) -> Example:
    options: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    if "target_scores" in raw:
        items = list(raw["target_scores"].items())
        # Files often list the right answer first; a fixed per-example shuffle keeps position
        # from leaking into prompts that list the choices.
        random.Random(raw["input"]).shuffle(items)
        options = tuple(str(k) for k, _ in items)
        scores = tuple(float(v) for _, v in items)
    target = raw.get("target")
    if target is None:
        top = max(scores)
        targets = tuple(o for o, s in zip(options, scores, strict=True) if s == top)
    else:
        targets = (target,) if isinstance(target, str) else tuple(str(t) for t in target)
    return Example(raw["input"], targets, options, scores, subtask)


def _answer_key(e: Example) -> tuple:
    return (frozenset(e.targets), frozenset(zip(e.options, e.scores, strict=True)))


def _deduplicate(examples: list[Example]) -> list[Example]:
    """Keep the first of repeated inputs; drop inputs whose copies disagree on the answer.

    A repeated input would otherwise land in train and held-out at once, and a contradictory
    one cannot be scored.
    """
    answers: dict[str, set[tuple]] = {}
    for e in examples:
        answers.setdefault(e.input, set()).add(_answer_key(e))
    seen: set[str] = set()
    kept = []
    for e in examples:
        if e.input not in seen and len(answers[e.input]) == 1:
            kept.append(e)
        seen.add(e.input)
    return kept


def reference_answer(task: Task, example: Example) -> str:
    """The example's answer as text: its first correct option, or its first target."""
    if task.mode == "multiple_choice":
        return example.options[example.correct[0]]
    return example.targets[0]
