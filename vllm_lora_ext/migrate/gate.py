"""Step 5: is the migrated adapter good enough to replace the old one?

On held-out inputs (never used to synthesise or train), the student's greedy answers are
compared with the teacher's. Where the real answer is known (seeds with an output) the decision
uses the task metric, exact match: the student may be at most ``tolerance`` below the teacher.
Otherwise it uses agreement with the teacher: at least ``min_agreement`` of the answers must
match. Both compare after :func:`~vllm_lora_ext.evaluation.scoring.normalize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_lora_ext.evaluation.scoring import exact_match


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


def decide(
    teacher_answers: Sequence[str],
    student_answers: Sequence[str],
    targets: Sequence[str | None],
    tolerance: float = 0.05,
    min_agreement: float = 0.8,
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
    if known:
        teacher_acc = sum(exact_match(t, [y]) for t, _, y in known) / len(known)
        student_acc = sum(exact_match(s, [y]) for _, s, y in known) / len(known)
        passed = student_acc >= teacher_acc - tolerance
        verdict = ">=" if passed else "<"
        reason = (
            f"student exact match {student_acc:.3f} {verdict} teacher {teacher_acc:.3f} - "
            f"tolerance {tolerance} on {len(known)} held-out inputs with known answers "
            f"(agreement with the teacher {agreement:.3f} on {n})"
        )
        return GateResult(passed, reason, n, agreement, len(known), teacher_acc, student_acc)
    passed = agreement >= min_agreement
    verdict = ">=" if passed else "<"
    reason = (
        f"student agrees with the teacher on {agree}/{n} held-out inputs "
        f"({agreement:.3f} {verdict} {min_agreement} required; no known answers)"
    )
    return GateResult(passed, reason, n, agreement)
