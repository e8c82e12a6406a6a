"""What each Migrator step produces, typed; the same records are its checkpoints.

A finished step writes its output to ``<work_dir>/<step>.json`` (the record as JSON, whole or
absent); a resumed migration reads it back validated into the same record. The JSON field names
are the checkpoint format, unchanged from when steps returned dicts: job folders already on disk
must keep loading, so a field keeps its name, and a new one needs a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter

from vllm_lora_ext.files import write_atomic
from vllm_lora_ext.migrate.discriminator import Calibration
from vllm_lora_ext.migrate.gate import GateResult
from vllm_lora_ext.migrate.synthesis import SynthesisCounts


@dataclass(frozen=True, kw_only=True)
class DiscriminatorSkipped:
    """No discriminator: the synthetic inputs go through another filter, or none."""

    skipped: Literal[True] = True


@dataclass(frozen=True, kw_only=True)
class DiscriminatorTrained:
    skipped: Literal[False] = False
    positives: int
    negatives: int
    final_loss: float
    steps_run: int
    calibration: Calibration | None
    """``None`` unless the spec asked for calibration (the threshold is then 0)."""

    @property
    def threshold(self) -> float:
        """Keep a synthetic input when its margin is above this."""
        return 0.0 if self.calibration is None else self.calibration.threshold


DiscriminatorOutput = DiscriminatorSkipped | DiscriminatorTrained


@dataclass(frozen=True, kw_only=True)
class SynthesisOutput:
    inputs: list[str]
    """The synthetic inputs kept, in the order they were written."""
    counts: SynthesisCounts
    fallback: str | None = None
    """Why the student learns from the observed inputs alone, when no synthetic one survived."""


@dataclass(frozen=True, kw_only=True)
class LabelOutput:
    train: list[tuple[str, str]]
    """(input, label) the student learns from."""
    gate: list[tuple[str, str, str | None]]
    """(input, the teacher's answer, the known answer if any), held out for the gate."""
    seed_answers: int
    """Training inputs labelled by their seed's known answer, not by the teacher."""
    unlabelled: int
    doubted: int
    """Training inputs dropped because the teacher's option was below ``choice_confidence``."""
    gate_synthetic: int
    truncated: int
    agreement: list[float]
    """Per input asked, the teacher's vote agreement (its option's probability, for choices)."""
    synthetic_pool: int
    synthetic_kept: int
    weights: list[float] | None = None
    """Per training row, its loss weight (``vote_weights``); None: every row counts alike."""


@dataclass(frozen=True, kw_only=True)
class StudentRecord:
    """One trained student of a soup."""

    rows: int
    too_long: int
    final_loss: float
    steps_run: int
    fit: list[tuple[int, float]]
    seed_offset: int

    @classmethod
    def from_card(cls, card: dict[str, Any], seed_offset: int) -> StudentRecord:
        """A student an interrupted run trained, from its distillation card."""
        kept = ("rows", "too_long", "final_loss", "steps_run", "fit")
        record = {key: card[key] for key in kept} | {"seed_offset": seed_offset}
        return TypeAdapter(cls).validate_python(record)


@dataclass(frozen=True, kw_only=True)
class SoupRecord:
    members: list[StudentRecord]
    soup_of: list[str]
    """The students' folders, in member order."""
    rank: int
    max_cut_error: float
    mean_cut_error: float
    """Relative Frobenius error of the cut back to ``rank``, over modules."""


@dataclass(frozen=True, kw_only=True)
class DistilOutput:
    """The student (with a soup: its first member's numbers, the soup's in ``soup``)."""

    rows: int
    too_long: int
    final_loss: float
    distillation: str
    steps_run: int
    fit: list[tuple[int, float]]
    """(step, fraction of training rows answered exactly as labelled), as measured."""
    soup: SoupRecord | None = None


@dataclass(frozen=True)
class StepOutputs:
    """Every step's output, in pipeline order."""

    discriminator: DiscriminatorOutput
    synthesise: SynthesisOutput
    label: LabelOutput
    distil: DistilOutput
    gate: GateResult

    def as_json(self) -> dict[str, Any]:
        """Per step, its checkpoint's JSON (what benchmarks record)."""
        return {step: to_json(step, getattr(self, step)) for step in SCHEMAS}


SCHEMAS: dict[str, TypeAdapter[Any]] = {
    "discriminator": TypeAdapter(DiscriminatorOutput),
    "synthesise": TypeAdapter(SynthesisOutput),
    "label": TypeAdapter(LabelOutput),
    "distil": TypeAdapter(DistilOutput),
    "gate": TypeAdapter(GateResult),
}
"""Step -> its output's schema, in pipeline order."""


class CheckpointInvalid(ValueError):
    """A checkpoint file exists but is not its step's output (another version wrote it)."""


def to_json(step: str, output: Any) -> Any:
    return SCHEMAS[step].dump_python(output, mode="json")


def write_checkpoint(work_dir: Path, step: str, output: Any) -> None:
    """``<work_dir>/<step>.json``, whole or absent, never half-written."""
    write_json(work_dir / f"{step}.json", to_json(step, output))


def read_checkpoint(work_dir: Path, step: str) -> Any | None:
    """The step's output from its checkpoint, ``None`` if there is none; raises
    :class:`CheckpointInvalid` if the file is not that step's output."""
    path = work_dir / f"{step}.json"
    if not path.is_file():
        return None
    try:
        # json.loads, not validate_json: it reads back a NaN as json.dumps wrote it
        return SCHEMAS[step].validate_python(json.loads(path.read_text()))
    except ValueError as e:  # not JSON, or a ValidationError: not this step's output
        raise CheckpointInvalid(f"{path} is not a {step} checkpoint: {e}") from e


def write_json(path: Path, data: Any) -> None:
    """Whole or absent, never half-written (checkpoints, the spec, the filter's audit)."""
    write_atomic(path, json.dumps(data, indent=1).encode())
