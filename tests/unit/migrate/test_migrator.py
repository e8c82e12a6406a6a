"""The Migrator as a job: every step end to end on tiny models, checkpoints and resume, cancel,
the ablation modes, and its errors.

The generator is scripted (a random tiny model writes nothing parseable): asked for task inputs
it writes digit strings 70% of the time and letter strings otherwise; asked with no task framing
it writes letter strings. The real inputs are digit strings, so a working discriminator keeps
the digits. The teacher maps digits -> "number", letters -> "word"; the student is a LoRA on a
tiny Gemma 3 (another tokenizer).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from migrate_fakes import DIGITS, LETTERS, FunctionBackend, number_or_word, query_of, strings
from pydantic import ValidationError
from transformers import AutoTokenizer

from vllm_lora_ext.migrate.checkpoints import SCHEMAS
from vllm_lora_ext.migrate.migrator import (
    CANDIDATES_FILE,
    DISCRIMINATOR_DIR,
    STEPS,
    STUDENT_DIR,
    MigrationCancelled,
    MigrationError,
    Migrator,
)
from vllm_lora_ext.migrate.spec import MigrationSpec, Seed, TrainParams, split_real

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def scripted_generator(tokenizer) -> FunctionBackend:
    def respond(prompt: str, seed: int) -> str:
        rng = random.Random(seed)
        if "Here are" not in prompt:
            return strings(rng, LETTERS, 1)[0]
        alphabet = DIGITS if rng.random() < 0.7 else LETTERS
        return f" {strings(rng, alphabet, 1)[0]}\n"

    return FunctionBackend(tokenizer, respond)


def make_spec(data: str = "filtered", student_lr: float = 1e-2) -> MigrationSpec:
    rng = random.Random(7)
    return MigrationSpec(
        adapter="numbers",
        task_description="number strings",
        seeds=[Seed(input=x, output="number") for x in strings(rng, DIGITS, 16)],
        reservoir=strings(rng, DIGITS, 16),
        target_count=24,
        data=data,
        discriminator=TrainParams(targets=TARGETS, steps=100, batch=16, lr=5e-3),
        student=TrainParams(targets=TARGETS, steps=40, batch=16, lr=student_lr),
        student_epochs=None,  # 40 steps, whatever the rows
        student_fit=0.0,  # all 40 steps: the tests below count them
        gate_min_known=1,  # the few held-out seeds decide by the task metric
        votes=0,  # greedy labels: the tests below count the teacher's calls and chunks
        answer_max_tokens=6,
        synthesis={"batch": 8, "max_tokens": 16},
    )


@pytest.fixture
def parts(tiny_model_dir: Path, tiny_gemma_dir: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return {
        "old_base": tiny_model_dir,
        "new_base": tiny_gemma_dir,
        "generator": scripted_generator(tok),
        "teacher": FunctionBackend(tok, lambda p, _: number_or_word(query_of(p))),
    }


def test_full_migration_resumes_after_cancel_without_redoing_steps(parts, tmp_path: Path):
    work = tmp_path / "job"
    first = Migrator(make_spec(), work, **parts)
    parts["teacher"].on_generate = first.cancel  # cancel while the teacher labels
    with pytest.raises(MigrationCancelled, match="during label: stopped after 32 of"):
        first.run()  # labels go out in chunks of 32: the cancel lands between the first two
    progress = first.progress
    assert progress.state == "cancelled" and progress.labelled == 32
    assert progress.completed == ["discriminator", "synthesise"]
    assert not (work / "label.json").exists() and not (work / STUDENT_DIR).exists()
    synth = json.loads((work / "synthesise.json").read_text())
    kept, counts = synth["inputs"], synth["counts"]
    digit_share = sum(x[0].isdigit() for x in kept) / len(kept)
    print(f"synthesis {counts}; digits among kept {digit_share:.2f} (generated ~0.70)")
    assert counts["kept"] >= 24 and counts["rejected"] > 0
    assert digit_share >= 0.9
    audit = json.loads((work / CANDIDATES_FILE).read_text())  # every candidate, with its score
    assert len(audit) == counts["kept"] + counts["rejected"]
    assert all((c["score"] > 0) == c["kept"] for c in audit)
    assert [c["text"] for c in audit if c["kept"]] == kept

    disc_weights = next((work / DISCRIMINATOR_DIR).glob("*.safetensors"))
    disc_mtime = disc_weights.stat().st_mtime_ns
    gen_calls, teacher_calls = parts["generator"].calls, parts["teacher"].calls
    parts["teacher"].on_generate = None

    # Resume in a fresh Migrator, driven the way an async route would drive it.
    second = Migrator(make_spec(), work, **parts)
    seen_steps: set[str | None] = set()

    async def drive():
        task = asyncio.create_task(asyncio.to_thread(second.run))
        while not task.done():
            seen_steps.add(second.progress.step)
            await asyncio.sleep(0.05)
        return await task

    result = asyncio.run(drive())
    assert parts["generator"].calls == gen_calls  # neither synthesis nor negatives redone
    assert parts["teacher"].calls == teacher_calls + 2  # only the unfinished labelling redone
    assert disc_weights.stat().st_mtime_ns == disc_mtime  # discriminator not retrained
    assert "distil" in seen_steps and not seen_steps & {"discriminator", "synthesise"}
    done = second.progress
    assert done.state == "done" and done.completed == [
        "discriminator", "synthesise", "label", "distil", "gate",
    ]  # fmt: skip
    assert done.kept == counts["kept"] and done.train_step == 40 and done.labelled > 24
    gate = result.gate
    print(f"gate: {gate.reason}")
    assert result.passed and gate.n_with_targets >= 1 and gate.student_accuracy == 1.0
    assert (result.adapter_dir / "adapter_config.json").is_file()
    # Each step's output is its checkpoint: the ones taken from the first run's files and the
    # ones made now alike, each of its schema's types throughout (no serialiser warning).
    for step in STEPS:
        SCHEMAS[step].dump_python(getattr(result.steps, step), warnings="error")
    assert result.counts == {s: json.loads((work / f"{s}.json").read_text()) for s in STEPS}


def test_unfiltered_and_seeds_only_modes(parts, tmp_path: Path):
    unfiltered = Migrator(make_spec("unfiltered"), tmp_path / "u", **parts).run()
    assert json.loads((tmp_path / "u" / "discriminator.json").read_text()) == {"skipped": True}
    assert unfiltered.counts["synthesise"]["counts"]["rejected"] == 0
    assert not (tmp_path / "u" / DISCRIMINATOR_DIR).exists()

    calls = parts["generator"].calls
    seeds_only = Migrator(make_spec("seeds_only"), tmp_path / "s", **parts).run()
    assert parts["generator"].calls == calls  # nothing synthesised
    train = json.loads((tmp_path / "s" / "label.json").read_text())["train"]
    assert len(train) == seeds_only.counts["distil"]["rows"] == 32 - seeds_only.gate.n
    assert seeds_only.passed


def test_divergence_fails_clearly_and_the_work_dir_is_bound_to_its_spec(parts, tmp_path: Path):
    migrator = Migrator(make_spec("seeds_only", student_lr=1e30), tmp_path, **parts)
    with pytest.raises(MigrationError, match=r"distil training diverged.*lower the learning rate"):
        migrator.run()
    assert migrator.progress.state == "failed" and "diverged" in migrator.progress.error
    assert not (tmp_path / STUDENT_DIR).exists() and not (tmp_path / "distil.json").exists()
    with pytest.raises(MigrationError, match="different migration spec"):
        Migrator(make_spec("seeds_only"), tmp_path, **parts).run()


def test_token_level_distillation_across_tokenizers_fails_before_any_work(parts, tmp_path):
    spec = make_spec("filtered").model_copy(update={"distillation": "token_kl"})
    migrator = Migrator(spec, tmp_path, **parts)
    with pytest.raises(MigrationError, match="token-level distillation is not possible here"):
        migrator.run()
    assert parts["generator"].calls == 0 and migrator.progress.state == "failed"


def test_token_level_distillation_runs_with_one_tokenizer(tiny_model_dir: Path, tmp_path: Path):
    """Old and new base share the tokenizer: the student learns from the teacher's top-k."""
    from vllm_lora_ext.evaluation.backends import TransformersBackend
    from vllm_lora_ext.migrate.distill import CARD_FILE

    teacher = TransformersBackend.from_pretrained(tiny_model_dir)
    spec = make_spec("seeds_only").model_copy(
        update={"distillation": "token_kl", "teacher_top_k": 8,
                "student": TrainParams(targets=TARGETS, steps=3, batch=16)}
    )  # fmt: skip
    result = Migrator(
        spec, tmp_path, old_base=tiny_model_dir, new_base=tiny_model_dir,
        generator=scripted_generator(teacher.tokenizer), teacher=teacher,
    ).run()  # fmt: skip
    assert result.counts["distil"]["distillation"] == "token_kl"
    card = json.loads((tmp_path / STUDENT_DIR / CARD_FILE).read_text())
    assert card["loss"] == "token-level KL" and card["rows"] == result.counts["distil"]["rows"]


def test_spec_needs_three_distinct_examples() -> None:
    with pytest.raises(ValidationError, match=r"at least 3 distinct example inputs.*got 0"):
        MigrationSpec(adapter="a", task_description="t")
    with pytest.raises(ValidationError, match="got 2"):
        MigrationSpec(
            adapter="a", task_description="t", seeds=[Seed(input="x")], reservoir=["X ", "y"]
        )
    spec = MigrationSpec(adapter="a", task_description="t", reservoir=["x", "y", "z"])
    assert MigrationSpec.model_validate_json(spec.model_dump_json()) == spec


@given(
    n_known=st.integers(0, 40),
    n_observed=st.integers(0, 200),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 3),
)
def test_the_gate_takes_half_the_known_answers_first(n_known, n_observed, fraction, seed):
    """Known answers go to the gate first (half, rounded up, as far as its share allows); the
    split never overlaps, loses nothing, and leaves two inputs to learn from."""
    if n_known + n_observed < 3:
        return
    spec = MigrationSpec(
        adapter="a", task_description="t", gate_fraction=fraction, seed=seed,
        seeds=[Seed(input=f"q{i}", output=f"a{i}") for i in range(n_known)],
        reservoir=[f"r{i}" for i in range(n_observed)],
    )  # fmt: skip
    gate, learn = split_real(spec)
    total = n_known + n_observed
    n_gate = min(max(1, round(fraction * total)), total - 2)
    assert len(gate) == n_gate and len(learn) == total - n_gate >= 2
    assert {x for x, _ in gate}.isdisjoint(learn)
    assert {x for x, _ in gate} | set(learn) == {s.input for s in spec.seeds} | set(spec.reservoir)
    known_in_gate = sum(y is not None for _, y in gate)
    assert known_in_gate >= min((n_known + 1) // 2, n_gate)


def test_seeds_keep_their_answers_and_held_out_synthetic_inputs_reach_the_gate(parts, tmp_path):
    """A teacher wrong on everything: seeds still train on their known answers; the gate sees
    the held-out seeds and ``gate_synthetic`` synthetic inputs the student never trained on."""
    spec = make_spec("unfiltered").model_copy(
        update={"gate_synthetic": 6, "student": TrainParams(targets=TARGETS, steps=2, batch=16)}
    )
    parts["teacher"] = FunctionBackend(parts["teacher"].tokenizer, lambda p, _: "wrong")
    result = Migrator(spec, tmp_path, **parts).run()
    label = json.loads((tmp_path / "label.json").read_text())
    seeds = {s.input: s.output for s in spec.seeds}
    train = dict(label["train"])
    assert label["seed_answers"] == sum(x in seeds for x in train) > 0
    assert all(y == seeds.get(x, "wrong") for x, y in train.items())
    synthetic = json.loads((tmp_path / "synthesise.json").read_text())["inputs"]
    held = [x for x, _, _ in label["gate"] if x in synthetic]
    assert label["gate_synthetic"] == len(held) == 6 and not set(held) & set(train)
    assert (
        result.gate.n
        == len(label["gate"])
        == len(held) + sum(x not in synthetic for x, _, _ in label["gate"])
    )
    assert all(t == "wrong" for _, t, _ in label["gate"])  # the teacher answered the gate


class AnswerScorer(FunctionBackend):
    """A FunctionBackend that also scores continuations: ``logprob(answer text)`` per token."""

    def __init__(self, backend: FunctionBackend, logprob) -> None:
        super().__init__(backend.tokenizer, backend.respond)
        self.logprob = logprob

    def continuation_logprobs(self, requests):
        return [
            tuple(self.logprob(self.tokenizer.decode(list(answer))) for _ in answer)
            for _, answer in requests
        ]


class SummedScorer(AnswerScorer):
    """An option's summed log-likelihood is its score (spread evenly over its tokens)."""

    def continuation_logprobs(self, requests):
        return [
            tuple(self.logprob(self.tokenizer.decode(list(a))) / len(a) for _ in a)
            for _, a in requests
        ]


def test_excess_filter_keeps_the_inputs_the_adapter_changes(parts, tmp_path: Path):
    """The base finds "word" likely anyway, "number" only with the adapter: ranking a pool by
    the adapter's excess keeps the digit strings (the task), with no discriminator trained.
    The old base scores through its own backend (the generator here cannot score)."""
    old_base = AnswerScorer(parts["generator"], lambda a: -0.1 if "word" in a else -4.0)
    parts["teacher"] = AnswerScorer(parts["teacher"], lambda a: -0.1)
    spec = make_spec().model_copy(update={"filter": "excess", "excess_pool": 2.0})
    result = Migrator(spec, tmp_path / "x", **parts, old_base_backend=old_base).run()
    assert json.loads((tmp_path / "x" / "discriminator.json").read_text()) == {"skipped": True}
    assert not (tmp_path / "x" / DISCRIMINATOR_DIR).exists()
    label = result.counts["label"]
    pool = result.counts["synthesise"]["counts"]["kept"]
    assert pool >= 48 and label["synthetic_pool"] == pool and label["synthetic_kept"] == 24
    audit = json.loads((tmp_path / "x" / CANDIDATES_FILE).read_text())
    kept = [c for c in audit if c["kept"]]
    assert len(audit) == pool and len(kept) == 24
    assert all(c["text"][0].isdigit() for c in kept)  # ~70% of the pool are digits: enough
    assert min(c["score"] for c in kept) >= max(c["score"] for c in audit if not c["kept"])
    synthetic_trained = [x for x, _ in label["train"] if x in {c["text"] for c in audit}]
    assert set(synthetic_trained) <= {c["text"] for c in kept}
    assert result.passed


def test_votes_drop_inputs_the_teacher_is_unsure_of(parts, tmp_path: Path):
    """A teacher that never answers a letter string the same way twice: with votes, only the
    digit strings (always "number") keep a label; the votes are recorded per input."""

    def respond(prompt: str, seed: int) -> str:
        return "number" if query_of(prompt)[0].isdigit() else f"word {seed}"

    parts["teacher"] = FunctionBackend(parts["teacher"].tokenizer, respond)
    spec = make_spec("unfiltered").model_copy(
        update={"votes": 4, "vote_agreement": 0.8, "answer_max_tokens": 24}
    )
    result = Migrator(spec, tmp_path / "v", **parts).run()
    label = result.counts["label"]
    assert all(y == "number" for _, y in label["train"])
    letters = sum(not x[0].isdigit() for x in result.counts["synthesise"]["inputs"])
    assert letters > 0 and label["unlabelled"] > 0
    assert sorted(label["agreement"])[:letters] == [0.2] * letters
    assert parts["teacher"].calls >= 5  # greedy + 4 sampled rounds
    # The gate's synthetic inputs come from the labelled ones: none of them is lost to votes.
    digits = sum(x[0].isdigit() for x in result.counts["synthesise"]["inputs"])
    held = [x for x, _, _ in label["gate"] if x in result.counts["synthesise"]["inputs"]]
    assert label["gate_synthetic"] == len(held) == min(spec.gate_synthetic, digits // 2) > 0
    assert all(t == "number" for _, t, _ in label["gate"])


def test_vote_weights_keep_doubted_answers_at_their_agreement(parts, tmp_path: Path):
    """``vote_weights`` with a low ``vote_agreement``: the letter strings the teacher answers
    differently every time are kept at weight 0.2 (1 of 5 answers), the digit strings it always
    answers "number" at 1, a seed's known answer at 1; the student trains on all of them."""

    def respond(prompt: str, seed: int) -> str:
        return "number" if query_of(prompt)[0].isdigit() else f"word {seed}"

    parts["teacher"] = FunctionBackend(parts["teacher"].tokenizer, respond)
    spec = make_spec("unfiltered").model_copy(
        update={"votes": 4, "vote_agreement": 0.2, "vote_weights": True, "answer_max_tokens": 24}
    )
    result = Migrator(spec, tmp_path / "w", **parts).run()
    label = result.counts["label"]
    known = {s.input for s in spec.seeds}
    assert label["unlabelled"] == 0 and len(label["weights"]) == len(label["train"])
    by_kind = {
        (x in known, y == "number"): w
        for (x, y), w in zip(label["train"], label["weights"], strict=True)
    }
    assert by_kind[(False, True)] == 1.0 and by_kind[(False, False)] == pytest.approx(0.2)
    assert all(w == 1.0 for (x, _), w in zip(label["train"], label["weights"], strict=True)
               if x in known)  # fmt: skip
    assert result.counts["distil"]["rows"] == len(label["train"])


def test_multiple_choice_candidates_without_two_options_never_reach_the_filter(parts, tmp_path):
    """A generator that writes options half the time: with ``choice_prefix`` only the inputs
    that list two options are kept, the rest count as unparsable, and every kept input gets
    the teacher's option as its label."""
    prefix = "\n  choice: "

    def respond(prompt: str, seed: int) -> str:
        rng = random.Random(seed)
        word = strings(rng, LETTERS, 1)[0]
        if "Here are" not in prompt:
            return word
        return f" {word}{prefix}one{prefix}two\n" if rng.random() < 0.5 else f" {word}\n"

    parts["generator"] = FunctionBackend(parts["generator"].tokenizer, respond)
    parts["teacher"] = AnswerScorer(parts["teacher"], lambda a: -0.1 if "two" in a else -3.0)
    rng = random.Random(3)
    spec = MigrationSpec.model_validate(
        make_spec("unfiltered").model_dump()
        | {
            "choice_prefix": prefix,
            "seeds": [Seed(input=f"{w}{prefix}one{prefix}two") for w in strings(rng, LETTERS, 8)],
            "reservoir": [],
            "target_count": 8,
            "synthesis": {"batch": 8, "max_tokens": 64},
        }
    )
    result = Migrator(spec, tmp_path / "mc", **parts).run()
    counts = result.counts["synthesise"]["counts"]
    synthetic = result.counts["synthesise"]["inputs"]
    assert counts["unparsable"] > 0 and counts["kept"] == len(synthetic) >= 8
    assert all(x.count("choice:") == 2 for x in synthetic)
    label = result.counts["label"]
    assert label["unlabelled"] == 0
    assert all(y == "two" for x, y in label["train"] if x in synthetic)


@pytest.mark.parametrize("ends_at_options", [True, False])
def test_a_bbh_input_ends_at_its_options_block(parts, tmp_path: Path, ends_at_options: bool):
    """A generator that goes on after the options (as the 135M one does: an answer, a reason):
    cut at the block, every input is kept with just its options; without the cut, none is in
    the format and the job falls back to the observed inputs."""
    prefix = "\nOptions:\n"

    def respond(prompt: str, seed: int) -> str:
        word = strings(random.Random(seed), LETTERS, 1)[0]
        if "Here are" not in prompt:
            return word
        return f" {word}{prefix}(A) one\n(B) two\nThe answer is (B), as {word} says."

    parts["generator"] = FunctionBackend(parts["generator"].tokenizer, respond)
    parts["teacher"] = AnswerScorer(parts["teacher"], lambda a: -0.1 if "B" in a else -3.0)
    rng = random.Random(3)
    seeds = [Seed(input=f"{w}{prefix}(A) one\n(B) two") for w in strings(rng, LETTERS, 8)]
    spec = MigrationSpec.model_validate(
        make_spec("unfiltered").model_dump()
        | {"choice_prefix": prefix, "seeds": seeds, "reservoir": [], "target_count": 8,
           "synthesis": {"batch": 8, "max_tokens": 64, "give_up_after": 16},
           "synthesis_ends_at_options": ends_at_options}
    )  # fmt: skip
    result = Migrator(spec, tmp_path / "mc", **parts).run()
    synthetic = result.counts["synthesise"]["inputs"]
    if ends_at_options:
        assert len(synthetic) >= 8
        assert all(x.endswith(f"{prefix}(A) one\n(B) two") for x in synthetic)
        assert all(y == "(B)" for x, y in result.counts["label"]["train"] if x in synthetic)
    else:
        assert synthetic == [] and result.counts["synthesise"]["fallback"]


def test_a_migration_without_any_synthetic_input_learns_from_the_observed_ones(parts, tmp_path):
    """A generator that never writes the task's format: no synthetic input survives, the job
    says so, and the student still trains on the real inputs (the gate decides as ever)."""
    parts["generator"] = FunctionBackend(parts["generator"].tokenizer, lambda p, s: " \n")
    spec = make_spec("unfiltered").model_copy(update={"target_count": 4})
    result = Migrator(spec, tmp_path / "none", **parts).run()
    synthesis = result.counts["synthesise"]
    assert synthesis["inputs"] == [] and synthesis["counts"]["unparsable"] == 32
    assert "no synthetic input survived after 32 generations" in synthesis["fallback"]
    label = result.counts["label"]
    real = {*(s.input for s in spec.seeds), *spec.reservoir}
    assert label["train"] and all(x in real for x, _ in label["train"])
    assert result.gate.n > 0


def test_the_gate_scores_a_multiple_choice_student_by_the_option_it_finds_most_likely(
    parts, tmp_path
):
    """Teacher and task score multiple choice by option log-likelihood; so does the gate. A
    student whose likeliest option is right passes even if it words its free answer otherwise
    (judged on its generated text it would score 0 and be refused)."""
    prefix = "\n  choice: "
    tok = parts["teacher"].tokenizer
    parts["teacher"] = AnswerScorer(parts["teacher"], lambda a: -0.1 if "two" in a else -3.0)
    wordy = FunctionBackend(tok, lambda p, _: "I think it is two")
    student = AnswerScorer(wordy, lambda a: -0.2 if "two" in a else -2.0)
    rng = random.Random(5)
    spec = MigrationSpec.model_validate(
        make_spec("seeds_only").model_dump()
        | {
            "choice_prefix": prefix,
            "seeds": [Seed(input=f"{w}{prefix}one{prefix}two", output="two")
                      for w in strings(rng, LETTERS, 12)],
            "reservoir": [],
        }
    )  # fmt: skip
    result = Migrator(spec, tmp_path / "mc", **parts, student_backend=lambda _: student).run()
    gate = result.gate
    assert gate.n_with_targets == 3 and gate.student_accuracy == gate.teacher_accuracy == 1.0
    assert gate.passed and gate.agreement == 1.0, gate.reason


def test_multiple_choice_labels_the_teacher_doubts_are_not_trained_on(parts, tmp_path):
    """``choice_confidence``: an input whose options the teacher finds equally likely (p = 0.5
    for its choice) is dropped from training, unless it is a seed with a known answer; the gate
    still sees the teacher's answer on every held-out input."""
    prefix = "\n  choice: "
    scores = {"two": -0.1, "one": -3.0, "uno": -1.0, "dos": -1.0}

    parts["teacher"] = SummedScorer(parts["teacher"], lambda a: scores[a.strip()])
    rng = random.Random(7)
    sure = [f"{w}{prefix}one{prefix}two" for w in strings(rng, LETTERS, 8)]
    unsure = [f"{w}{prefix}uno{prefix}dos" for w in strings(rng, LETTERS, 8)]
    seeds = [Seed(input=x, output="dos") for x in unsure[:2]]
    spec = MigrationSpec.model_validate(
        make_spec("seeds_only").model_dump()
        | {"choice_prefix": prefix, "choice_confidence": 0.7, "seeds": seeds,
           "reservoir": sure + unsure[2:]}
    )  # fmt: skip
    result = Migrator(spec, tmp_path / "mc", **parts).run()
    label = result.counts["label"]
    trained = {x: y for x, y in label["train"]}
    gated = {x for x, _, _ in label["gate"]}
    assert all(trained[x] == "two" for x in sure if x not in gated)
    # The doubted inputs: only the seeds are trained on, with their known answers.
    assert {x: y for x, y in trained.items() if x in unsure} == {
        s.input: "dos" for s in seeds if s.input not in gated
    }
    assert label["doubted"] == sum(x not in gated for x in unsure[2:]) > 0
    assert label["unlabelled"] == label["doubted"]
    assert all(a == "two" or x in unsure for x, a, _ in label["gate"])
    assert {x for x in unsure if x in gated} <= {x for x, _, _ in label["gate"]}


def test_soft_label_draws_teach_the_teachers_doubt(parts, tmp_path: Path):
    """``soft_label_draws=8``: every teacher-labelled multiple-choice input is trained on 8
    times, with options drawn from the teacher's probabilities: where it is sure (p(two) ~0.95)
    nearly all draws are its choice, where it is not (uno/dos at 0.5 each) both options are
    taught; seeds keep their one known answer. A budget in epochs counts an input's draws
    once: the same steps as without them, only the labels differ."""
    prefix = "\n  choice: "
    scores = {"two": -0.05, "one": -3.0, "uno": -1.0, "dos": -1.0}

    parts["teacher"] = SummedScorer(parts["teacher"], lambda a: scores[a.strip()])
    rng = random.Random(11)
    sure = [f"{w}{prefix}one{prefix}two" for w in strings(rng, LETTERS, 8)]
    unsure = [f"{w}{prefix}uno{prefix}dos" for w in strings(rng, LETTERS, 8)]
    seeds = [Seed(input=x, output="dos") for x in unsure[:2]]
    spec = MigrationSpec.model_validate(
        make_spec("seeds_only").model_dump()
        | {"choice_prefix": prefix, "soft_label_draws": 8, "seeds": seeds,
           "reservoir": sure + unsure[2:], "student_epochs": 2.0}
    )  # fmt: skip
    counts = Migrator(spec, tmp_path / "soft", **parts).run().counts
    label = counts["label"]
    rows: dict[str, list[str]] = {}
    for x, y in label["train"]:
        rows.setdefault(x, []).append(y)
    assert len(label["train"]) > len(rows)
    assert counts["distil"]["steps_run"] == math.ceil(2.0 * len(rows) / 16)
    for s in seeds:
        assert rows.get(s.input, ["dos"]) == ["dos"]  # once, its known answer (unless gated)
    taught = {x: ys for x, ys in rows.items() if x not in {s.input for s in seeds}}
    assert taught and all(len(ys) == 8 for ys in taught.values())
    sure_draws = [y for x, ys in taught.items() if x in sure for y in ys]
    unsure_draws = [y for x, ys in taught.items() if x in unsure for y in ys]
    assert sure_draws.count("two") >= 0.8 * len(sure_draws)
    assert {"uno", "dos"} == set(unsure_draws)
    assert 0.25 <= unsure_draws.count("uno") / len(unsure_draws) <= 0.75


def test_a_soup_of_students_is_the_mean_of_their_deltas_cut_to_the_student_rank(parts, tmp_path):
    """``student_soup=2``: two students with one LoRA init (the spec's seed) and batch orders
    0 and 1; the adapter is their mean delta at the student's rank; a re-run after losing the
    adapter reuses both trained students."""
    import torch

    from vllm_lora_ext.adapters.lora_weights import load_lora
    from vllm_lora_ext.migrate.distill import CARD_FILE
    from vllm_lora_ext.migrate.soup import mean_delta, truncated_with_errors

    spec = make_spec("seeds_only").model_copy(update={"student_soup": 2})
    work = tmp_path / "soup"
    result = Migrator(spec, work, **parts).run()
    soup = result.counts["distil"]["soup"]
    assert [m["seed_offset"] for m in soup["members"]] == [0, 1]
    assert all(m["steps_run"] == 40 for m in soup["members"])
    cards = [json.loads((work / f"{STUDENT_DIR}-{i}" / CARD_FILE).read_text()) for i in range(2)]
    assert [(c["hyperparameters"]["seed"], c["hyperparameters"]["order_seed"]) for c in cards] == [
        (spec.seed, spec.seed), (spec.seed, spec.seed + 1)]  # fmt: skip
    members = [load_lora(work / f"{STUDENT_DIR}-{i}") for i in range(2)]
    adapter = load_lora(result.adapter_dir)
    assert adapter.rank == spec.student.rank == soup["rank"]
    cut, _ = truncated_with_errors(mean_delta(members), spec.student.rank)
    module = adapter.modules()[0]
    torch.testing.assert_close(adapter.delta(module), cut.delta(module), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(members[0].delta(module), members[1].delta(module))

    trained = [(work / f"{STUDENT_DIR}-{i}" / "adapter_model.safetensors").stat().st_mtime_ns
               for i in range(2)]  # fmt: skip
    (work / "distil.json").unlink()
    again = Migrator(spec, work, **parts).run()
    assert [(work / f"{STUDENT_DIR}-{i}" / "adapter_model.safetensors").stat().st_mtime_ns
            for i in range(2)] == trained  # fmt: skip
    assert again.counts["distil"]["soup"]["members"] == soup["members"]


def test_task_prompted_negatives_are_the_generators_task_inputs_on_seeds_of_their_own(
    parts, tmp_path: Path
):
    """``discriminator_negatives: task_prompted`` (the paper's filter): the discriminator's
    negatives are what the generator writes when asked for task inputs, not its unprompted
    text, drawn on seeds the synthesis it then filters never uses."""
    calls: list[tuple[str | None, bool, int]] = []  # (migrator step, task prompt, seed)
    step: list[str | None] = [None]
    respond = parts["generator"].respond

    def logged(prompt: str, seed: int) -> str:
        calls.append((step[0], "Here are" in prompt, seed))
        return respond(prompt, seed)

    parts["generator"].respond = logged
    spec = make_spec().model_copy(update={"discriminator_negatives": "task_prompted"})
    migrator = Migrator(spec, tmp_path / "x", **parts)
    parts["generator"].on_generate = lambda: step.__setitem__(0, migrator.progress.step)
    result = migrator.run()
    negatives = [c for c in calls if c[0] == "discriminator"]
    synthesis = [c for c in calls if c[0] == "synthesise"]
    assert negatives and synthesis and all(task for _, task, _ in negatives)
    assert not {s for *_, s in negatives} & {s for *_, s in synthesis}
    _, positives = split_real(spec)
    disc = result.counts["discriminator"]
    assert disc["negatives"] == max(len(positives), 8) and disc["positives"] == len(positives)


@pytest.mark.parametrize("epochs", [0.5, 2.0])
def test_a_student_budget_in_epochs_runs_that_many_passes_over_its_rows(
    parts, tmp_path: Path, epochs: float
):
    """``student_epochs``: ceil(epochs x rows / batch) steps over the rows the student trains
    on (seeds only here: ~24 rows in batches of 16), every one run (``student_fit: 0``)."""
    spec = make_spec("seeds_only").model_copy(update={"student_epochs": epochs})
    result = Migrator(spec, tmp_path / "e", **parts).run()
    rows = len(json.loads((tmp_path / "e" / "label.json").read_text())["train"])
    assert result.counts["distil"]["steps_run"] == math.ceil(epochs * rows / 16)
