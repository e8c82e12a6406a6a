"""Tasks as examples with seeded train / validation / held-out splits and their provenance.

Two sources: the BIG-Bench Hard files of :mod:`task_cache` (``bbh@9ee07bd``) and the arithmetic
we generate (``generated:arithmetic@seed0``). A task is multiple choice when its answers come from
a known set (:mod:`bbh`), scored by option log-likelihood; otherwise it is generated and scored by
exact match. Splits are a seeded permutation of groups of de-duplicated examples; the seed, the
sizes and each split's sha256 travel with the :class:`Task` (:meth:`Task.provenance`), so a number
reported later can be traced to exactly the examples it was measured on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vllm_lora_ext.evaluation import arithmetic
from vllm_lora_ext.evaluation.bbh import OPTIONS_HEADER, answer_sets, parse_options, scorable
from vllm_lora_ext.evaluation.task_cache import BBH_SHA256, BBH_SOURCE, read_task_file, task_file

Mode = Literal["multiple_choice", "generate"]
SPLITS = ("train", "validation", "heldout")
DEFAULT_HELDOUT = 100
"""Held-out examples per task (BBH tasks have 178 to 250): enough for a 95% interval of about
plus or minus 0.1, and the same examples for every system that is compared. A smaller task (the
suite's synthetic ones) holds out 60% of its examples instead."""
DEFAULT_VALIDATION = 20
"""At most a tenth of a task."""


@dataclass(frozen=True)
class Example:
    input: str
    targets: tuple[str, ...]
    """Accepted answers."""
    options: tuple[str, ...] = ()
    """Multiple choice: the answer strings scored by log-likelihood, in the input's order."""
    scores: tuple[float, ...] = ()
    """1.0 for a correct option, else 0.0, aligned with ``options``."""
    subtask: str = ""
    group: str = ""
    """Examples sharing a non-empty group land in one split (arithmetic: the operand pair)."""

    @property
    def correct(self) -> tuple[int, ...]:
        """Indices of the options with the top score (several may tie)."""
        top = max(self.scores, default=None)
        return tuple(i for i, s in enumerate(self.scores) if s == top)


@dataclass(frozen=True)
class TaskFormat:
    """Prompt fields around an input; ``None`` prefixes mean "none declared". BBH inputs carry
    their own question and options, so its tasks use the defaults."""

    task_prefix: str = ""
    input_prefix: str | None = None
    output_prefix: str | None = None
    choice_prefix: str = "\n  choice: "
    append_choices: bool = False


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
    """Examples removed before splitting: repeated inputs, inputs with conflicting answers, and
    targets that are not among their own options."""
    sources: dict[str, str] = field(default_factory=dict)
    """Task file -> sha256, as verified when loaded (empty for a generated task)."""
    source: str = ""
    """Where the examples come from: ``bbh@9ee07bd`` or ``generated:arithmetic@seed0``."""

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

    @property
    def choice_prefix(self) -> str | None:
        """What a migration of this task is told about its options (``MigrationSpec``): BBH's
        options block when every input lists its options, else None (a closed pair such as
        True/False, or a free form, is labelled by the teacher's generated answer)."""
        if self.mode == "multiple_choice" and all(parse_options(e.input) for e in self.examples):
            return OPTIONS_HEADER
        return None

    def provenance(self) -> dict:
        """What every card and result file records about the examples it used."""
        return {
            "task": self.name,
            "task_source": self.source,
            "task_files_sha256": dict(self.sources),
            "split_seed": self.seed,
            "split_sizes": self.sizes,
            "split_sha256": {s: split_sha256(self.split(s)) for s in SPLITS},
        }


def split_sha256(examples: tuple[Example, ...]) -> str:
    """sha256 of a split's inputs and answers in order (canonical JSON)."""
    rows = [[e.input, list(e.targets), list(e.options)] for e in examples]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def task_names() -> list[str]:
    return ["arithmetic", *sorted(BBH_SHA256)]


def load_task(
    name: str,
    cache_dir: Path | None = None,
    seed: int = 0,
    validation: float | int | None = None,
    heldout: float | int | None = None,
    mode: Mode | None = None,
) -> Task:
    """Load a task and split it.

    ``validation`` / ``heldout``: a fraction of the examples (float) or a count (int), by default
    :data:`DEFAULT_VALIDATION` and :data:`DEFAULT_HELDOUT` where the task is large enough; the
    rest is ``train``. ``mode`` overrides the preferred scoring (e.g. a multiple-choice task
    generated). Raises ValueError naming the valid tasks for an unknown ``name``.
    """
    if name == "arithmetic":
        examples = [Example(p.input, (p.target,), subtask=p.subtask, group=p.group)
                    for p in arithmetic.generate()]  # fmt: skip
        total, sources, source = len(examples), {}, arithmetic.task_source()
    elif name in BBH_SHA256:
        raw, sha = read_task_file(task_file(name), cache_dir)
        examples = _bbh_examples(name, raw)
        total, sources, source = len(raw["examples"]), {task_file(name): sha}, BBH_SOURCE
    else:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    kept = _deduplicate(examples)
    preferred: Mode = "multiple_choice" if kept and all(e.options for e in kept) else "generate"
    mode = mode or preferred
    if mode == "multiple_choice" and preferred != "multiple_choice":
        raise ValueError(f"task {name!r} has free-form answers: it is not multiple choice")
    if heldout is None:
        heldout = min(DEFAULT_HELDOUT, int(0.6 * len(kept)))
    if validation is None:
        validation = min(DEFAULT_VALIDATION, len(kept) // 10)
    train, val, held = split_examples(kept, seed, validation, heldout)
    return Task(name, mode, TaskFormat(), train, val, held, seed=seed,
                dropped=total - len(kept), sources=sources, source=source)  # fmt: skip


def _bbh_examples(name: str, raw: dict) -> list[Example]:
    items = raw["examples"]
    inputs, targets = [str(e["input"]) for e in items], [str(e["target"]) for e in items]
    options = answer_sets(inputs, targets)
    return [
        Example(text, (target,), opts, tuple(float(o == target) for o in opts), subtask=name)
        for text, target, opts in zip(inputs, targets, options, strict=True)
        if scorable(opts, target)
    ]


def split_examples(
    examples: list[Example], seed: int, validation: float | int, heldout: float | int
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    """(train, validation, heldout): groups of examples (:attr:`Example.group`, else each input
    alone) in a ``random.Random(seed)`` order, whole groups filling held-out, then validation,
    each until it holds at least its count; the rest is train."""
    n = len(examples)
    n_heldout, n_validation = _count(heldout, n), _count(validation, n)
    if n_heldout + n_validation > n:
        raise ValueError(f"held-out {n_heldout} + validation {n_validation} exceed {n} examples")
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.group or "\0" + e.input, []).append(e)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: list[Example] = []
    val: list[Example] = []
    train: list[Example] = []
    for members in order:
        if len(held) < n_heldout:
            held += members
        elif len(val) < n_validation:
            val += members
        else:
            train += members
    return tuple(train), tuple(val), tuple(held)


def _count(size: float | int, n: int) -> int:
    if isinstance(size, bool) or size < 0:
        raise ValueError(f"a split size must be a non-negative count or fraction, got {size!r}")
    if isinstance(size, float):
        if size > 1:
            raise ValueError(f"a split fraction must be at most 1, got {size}")
        return round(size * n)
    return size


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
