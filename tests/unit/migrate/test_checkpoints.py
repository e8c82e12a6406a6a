"""Step outputs as checkpoints: files the Migrator wrote before its outputs were typed load into
the typed records and write back as the same JSON; a file that is not its step's output stops
a resumed job, saying which file.

The ``WRITTEN`` files are abridged from job folders the earlier Migrator wrote (its unit tests'
work directories), key order included; the calibration record is the one ``asdict`` made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_lora_ext.migrate.checkpoints import (
    SCHEMAS,
    CheckpointInvalid,
    DiscriminatorSkipped,
    DiscriminatorTrained,
    LabelOutput,
    StudentRecord,
    read_checkpoint,
    write_checkpoint,
)
from vllm_lora_ext.migrate.gate import GateResult
from vllm_lora_ext.migrate.migrator import MigrationError, Migrator
from vllm_lora_ext.migrate.spec import MigrationSpec, Seed

CALIBRATION = {
    "threshold": 0.25,
    "balanced_accuracy": 0.875,
    "positives": [1.5, 0.5],
    "negatives": [-2.0, 0.125],
    "best_step": 40,
    "checks": [[20, 0.5], [40, 0.25]],
}
SOUP = {
    "members": [
        {"rows": 24, "too_long": 0, "final_loss": 0.1878, "steps_run": 40, "fit": [],
         "seed_offset": 0},
        {"rows": 24, "too_long": 0, "final_loss": 0.184, "steps_run": 40, "fit": [[10, 0.5]],
         "seed_offset": 1},
    ],
    "soup_of": ["/jobs/soup/adapter-0", "/jobs/soup/adapter-1"],
    "rank": 8,
    "max_cut_error": 0.0072,
    "mean_cut_error": 0.0045,
}  # fmt: skip
WRITTEN = {
    "discriminator": [
        {"skipped": True},
        {"skipped": False, "positives": 24, "negatives": 24, "final_loss": 0.001,
         "steps_run": 100, "calibration": None},
        {"skipped": False, "positives": 24, "negatives": 24, "final_loss": 0.001,
         "steps_run": 100, "calibration": CALIBRATION},
    ],
    "synthesise": [
        {"inputs": ["4177", "25979190"],
         "counts": {"generated": 40, "unparsable": 0, "duplicates": 0, "rejected": 9, "kept": 2}},
        {"inputs": [],
         "counts": {"generated": 32, "unparsable": 32, "duplicates": 0, "rejected": 0, "kept": 0},
         "fallback": "no synthetic input survived after 32 generations (32 unparsable, ...)"},
    ],
    "label": [
        {"train": [["4121547", "number"], ["7924", "number"]],
         "gate": [["13909960", "number", "number"], ["qwerty", "word", None]],
         "seed_answers": 8, "unlabelled": 0, "doubted": 0, "gate_synthetic": 15, "truncated": 0,
         "agreement": [1.0, 0.667], "synthetic_pool": 31, "synthetic_kept": 31},
        {"train": [["4121547", "number"], ["7924", "word"]],
         "gate": [["13909960", "number", "number"]],
         "seed_answers": 1, "unlabelled": 0, "doubted": 0, "gate_synthetic": 0, "truncated": 0,
         "agreement": [0.4], "synthetic_pool": 0, "synthetic_kept": 0, "weights": [1.0, 0.4]},
    ],
    "distil": [
        {"rows": 40, "too_long": 0, "final_loss": 0.1939, "distillation": "sequence",
         "steps_run": 40, "fit": [], "soup": None},
        {"rows": 24, "too_long": 0, "final_loss": 0.1878, "distillation": "token_kl",
         "steps_run": 40, "fit": [[10, 0.75], [20, 1.0]], "soup": SOUP},
    ],
    "gate": [
        {"passed": True, "reason": "student exact match 1.000 ...", "n": 23, "agreement": 1.0,
         "n_with_targets": 8, "teacher_accuracy": 1.0, "student_accuracy": 1.0,
         "interval": [0.6755843804891231, 1.0]},
        {"passed": False, "reason": "too few to decide", "n": 3, "agreement": 0.0,
         "n_with_targets": 0, "teacher_accuracy": None, "student_accuracy": None,
         "interval": None},
    ],
}  # fmt: skip
CASES = [(step, data) for step, files in WRITTEN.items() for data in files]


def test_every_step_has_written_files_here() -> None:
    assert list(WRITTEN) == list(SCHEMAS)


@pytest.mark.parametrize(("step", "data"), CASES)
def test_a_written_checkpoint_loads_and_writes_back_the_same(
    tmp_path: Path, step: str, data: dict
) -> None:
    (tmp_path / f"{step}.json").write_text(json.dumps(data, indent=1))
    out = read_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path / "again", step, out)
    again = json.loads((tmp_path / "again" / f"{step}.json").read_text())
    # the only changes: a field added later with its default, written where it was omitted
    # (a synthesis without a fallback: "fallback": null; labels without weights: null)
    added = {"synthesise": "fallback", "label": "weights"}.get(step)
    assert again == ({**data, added: data.get(added)} if added else data)
    assert list(again) == [*data, *(k for k in again if k not in data)]  # order as before
    assert read_checkpoint(tmp_path / "again", step) == out


def test_loaded_checkpoints_are_typed() -> None:
    def load(step: str, i: int):
        return SCHEMAS[step].validate_python(WRITTEN[step][i])

    assert load("discriminator", 0) == DiscriminatorSkipped()
    trained = load("discriminator", 2)
    assert isinstance(trained, DiscriminatorTrained) and trained.threshold == 0.25
    assert trained.calibration is not None and trained.calibration.checks == [(20, 0.5), (40, 0.25)]
    assert load("discriminator", 1).threshold == 0.0
    assert load("synthesise", 1).counts.unparsable == 32 and load("synthesise", 0).fallback is None
    label = load("label", 0)
    assert isinstance(label, LabelOutput) and label.gate[1] == ("qwerty", "word", None)
    soup = load("distil", 1).soup
    assert soup is not None and soup.members[1] == StudentRecord(
        rows=24, too_long=0, final_loss=0.184, steps_run=40, fit=[(10, 0.5)], seed_offset=1
    )
    gate = load("gate", 0)
    assert isinstance(gate, GateResult) and gate.interval == (0.6755843804891231, 1.0)


def test_a_soup_member_comes_back_from_its_distillation_card() -> None:
    card = {"hyperparameters": {"rank": 8}, "rows": 42, "too_long": 1, "loss": "…",
            "steps_run": 2, "fit": [[1, 0.5]], "final_loss": 6.36}  # fmt: skip
    assert StudentRecord.from_card(card, seed_offset=3) == StudentRecord(
        rows=42, too_long=1, final_loss=6.36, steps_run=2, fit=[(1, 0.5)], seed_offset=3
    )


@pytest.mark.parametrize(
    ("step", "text"),
    [
        ("discriminator", '{"skipped": false}'),  # a trained one says what it trained on
        ("label", json.dumps(WRITTEN["synthesise"][0])),  # another step's output
        ("gate", '{"passed": "maybe", "reason": "", "n": 1, "agreement": 1.0}'),
        ("distil", '{"rows": 4'),  # not JSON
    ],
)
def test_a_file_that_is_not_its_steps_output_is_refused(tmp_path: Path, step, text) -> None:
    (tmp_path / f"{step}.json").write_text(text)
    with pytest.raises(CheckpointInvalid, match=rf"{step}\.json is not a {step} checkpoint"):
        read_checkpoint(tmp_path, step)


def test_a_resumed_migration_stops_at_an_invalid_checkpoint(tmp_path: Path) -> None:
    spec = MigrationSpec(adapter="a", task_description="t", data="unfiltered",
                         seeds=[Seed(input=str(i), output="n") for i in range(8)])  # fmt: skip
    (tmp_path / "discriminator.json").write_text('{"skipped": "perhaps"}')
    migrator = Migrator(spec, tmp_path, old_base=tmp_path, new_base=tmp_path,
                        generator=None, teacher=None)  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(MigrationError, match=r"discriminator\.json is not a discriminator check"):
        migrator.run()  # before any model is loaded or asked
    assert migrator.progress.state == "failed" and migrator.progress.completed == []
