"""Arithmetic we generate ourselves: 1- and 2-digit addition and subtraction in BIG-bench's
wording ("What is 12 plus 7?" -> "19"), so no download stands between a fresh machine and the
task. The problems are a seeded draw; the split keeps each unordered operand pair in one split
(``group``), so "12 plus 7" in train never teaches the held-out "7 plus 12" or "12 minus 7".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ARITHMETIC_SEED = 0
"""The one dataset every card and result uses; a split seed permutes it, it does not redraw it."""
PER_SUBTASK = 100
# (subtask, digits, operator word); 1-digit operands are 0-9, 2-digit ones 10-99
SUBTASKS: tuple[tuple[str, int, str], ...] = (
    ("1_digit_addition", 1, "plus"),
    ("1_digit_subtraction", 1, "minus"),
    ("2_digit_addition", 2, "plus"),
    ("2_digit_subtraction", 2, "minus"),
)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    operator: str
    """"plus" or "minus"."""
    subtask: str

    @property
    def input(self) -> str:
        return f"What is {self.a} {self.operator} {self.b}?"

    @property
    def target(self) -> str:
        return str(self.a + self.b if self.operator == "plus" else self.a - self.b)

    @property
    def group(self) -> str:
        """The unordered operand pair: every problem of a pair lands in the same split."""
        low, high = sorted((self.a, self.b))
        return f"{low},{high}"


def task_source(seed: int = ARITHMETIC_SEED) -> str:
    """``task_source`` of the generated task in cards and result files."""
    return f"generated:arithmetic@seed{seed}"


def generate(seed: int = ARITHMETIC_SEED, per_subtask: int = PER_SUBTASK) -> list[Problem]:
    """``per_subtask`` distinct ordered operand pairs per subtask (all of them if fewer exist),
    drawn with ``random.Random(seed)``: the same list on every machine and Python version."""
    if per_subtask < 1:
        raise ValueError(f"per_subtask must be at least 1, got {per_subtask}")
    rng = random.Random(seed)
    problems = []
    for subtask, digits, operator in SUBTASKS:
        low, high = (0, 9) if digits == 1 else (10, 99)
        pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
        for a, b in rng.sample(pairs, min(per_subtask, len(pairs))):
            problems.append(Problem(a, b, operator, subtask))
    return problems
