"""Step 5: is the migrated adapter good enough to replace the old one?

On held-out inputs (never used to synthesise or train: real ones, plus synthetic ones kept out
of the student's training), the student's greedy answers are compared with the teacher's. With
at least ``min_known`` real answers known (seeds with an output) the decision uses the task
metric, exact match: the student may be at most ``tolerance`` below the teacher. Otherwise it
uses agreement with the teacher on every held-out input: at least ``min_agreement`` of the
answers must match, on at least ``min_checked`` inputs (fewer cannot tell a good student from
a lucky one: the gate then refuses, saying so). Answers compare after
:func:`~vllm_lora_ext.evaluation.scoring.normalize`.
Every verdict states its 95% interval, so a decision on few inputs reads as what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_lora_ext.evaluation.scoring import exact_match, wilson_interval

MIN_KNOWN = 10
"""Known answers needed before the task metric decides (fewer tell little, and agreement with
the teacher on every held-out input is the better evidence then)."""

MIN_CHECKED = 20
"""Held-out inputs needed before agreement with the teacher decides: with 20, an agreement of
0.8 has a 95% interval of about [0.58, 0.92]; with 5 it spans [0.38, 0.96]."""


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    """Why it passed or failed, with the numbers."""
    n: int
    agreement: float
    """Fraction of held-out inputs where student and teacher answer the same."""
    n_with_targets: int = 0
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    interval: tuple[float, float] | None = None
    """95% Wilson interval of the quantity that decided (student accuracy or agreement)."""


def _interval(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"95% interval [{lo:.2f}, {hi:.2f}]"


def decide(
    teacher_answers: Sequence[str],
    student_answers: Sequence[str],
    targets: Sequence[str | None],
    tolerance: float = 0.05,
    min_agreement: float = 0.8,
    min_known: int = MIN_KNOWN,
    min_checked: int = MIN_CHECKED,
) -> GateResult:
    """Pass/fail from answers alone (a pure function, so the rule is testable on strings)."""
    n = len(teacher_answers)
    if not (n == len(student_answers) == len(targets)):
        raise ValueError("teacher answers, student answers and targets differ in length")
    if n == 0:
        return GateResult(False, "no held-out inputs to check the migrated adapter on", 0, 0.0)
    agree = sum(exact_match(s, [t]) for s, t in zip(student_answers, teacher_answers, strict=True))
    agreement = agree / n
    known = [
        (t, s, y)
        for t, s, y in zip(teacher_answers, student_answers, targets, strict=True)
        if y is not None
    ]
    if len(known) >= min_known:
        teacher_hits = sum(exact_match(t, [y]) for t, _, y in known)
        student_hits = sum(exact_match(s, [y]) for _, s, y in known)
        teacher_acc, student_acc = teacher_hits / len(known), student_hits / len(known)
        passed = student_acc >= teacher_acc - tolerance
        verdict = ">=" if passed else "<"
        reason = (
            f"student exact match {student_acc:.3f} ({_interval(student_hits, len(known))}) "
            f"{verdict} teacher {teacher_acc:.3f} - tolerance {tolerance} on {len(known)} "
            f"held-out inputs with known answers (agreement with the teacher {agreement:.3f} "
            f"on {n})"
        )
        return GateResult(
            passed, reason, n, agreement, len(known), teacher_acc, student_acc,
            wilson_interval(student_hits, len(known)),
        )  # fmt: skip
    if n < min_checked:
        passed = False
        reason = (
            f"too few held-out inputs to decide: the student agrees with the teacher on "
            f"{agree}/{n} ({agreement:.3f}, {_interval(agree, n)}), but agreement decides only "
            f"on {min_checked} or more, and {len(known)} known answers are fewer than "
            f"{min_known}"
        )
    else:
        passed = agreement >= min_agreement
        verdict = ">=" if passed else "<"
        reason = (
            f"student agrees with the teacher on {agree}/{n} held-out inputs "
            f"({agreement:.3f}, {_interval(agree, n)}; {verdict} {min_agreement} required; "
            f"{len(known)} known answers, fewer than {min_known})"
        )
    return GateResult(passed, reason, n, agreement, len(known), interval=wilson_interval(agree, n))
