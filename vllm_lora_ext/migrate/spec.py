"""What a migration is asked to do: pydantic, validated on construction, JSON round-trip.

The spec is the job's identity: the migrator stores it beside its checkpoints and refuses to
resume checkpoints written for a different one. ``split_real`` is here too, because which real
inputs are held out for the gate is part of the spec (seeded), not of any one step.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_lora_ext.migrate.gate import MIN_CHECKED, MIN_KNOWN
from vllm_lora_ext.migrate.synthesis import dedupe_key
from vllm_lora_ext.training import LoraHyperparameters

MIN_EXAMPLES = 3
"""Real inputs needed: at least one held out for the gate and two to synthesise from."""


class Seed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1)
    output: str | None = None
    """The known answer, if any: the gate then scores the task metric on it."""


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    steps: int = Field(60, ge=1)
    batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: float = Field(0.0, ge=0, lt=1)
    """Fraction of ``steps`` with a linear learning-rate warmup."""
    decay: bool = False
    """Cosine decay of the learning rate after warmup (to a tenth)."""

    def hyperparameters(self, seed: int, order_seed: int | None = None) -> LoraHyperparameters:
        return LoraHyperparameters(
            self.rank, self.alpha, tuple(self.targets), self.steps, self.batch, self.lr, seed,
            order_seed, self.warmup, self.decay,
        )  # fmt: skip


def _student() -> TrainParams:
    """Warmup and decay over the student's budget; ``student_epochs`` sets its steps (``steps``
    counts only when that is None). lr 2e-3: the rate of the ceilings that chose the budget
    (``benchmarks/results/migration_ceilings_steps*.json``)."""
    return TrainParams(steps=200, lr=2e-3, warmup=0.1, decay=True)


class SynthesisParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shots: int = Field(4, ge=1)
    batch: int = Field(16, ge=1)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    attempts_per_input: int = Field(8, ge=1)
    """Generation budget: ``target_count * attempts_per_input`` generations at most."""
    give_up_after: int = Field(64, ge=0)
    """Stop once this many generations were made and so few were in the task's input format
    that the whole budget could not yield ``target_count`` at that rate (0: never): the
    generator cannot write this task's inputs, and the rest of the budget would buy little
    (SmolLM2 wrote 256 disambiguation_qa inputs, none listing two options, in 13 minutes of an
    18-minute migration; on another run 1 of its first 64 was well-formed)."""


class MigrationOptions(BaseModel):
    """How every adapter of a migration is carried over (the same for each adapter of a job)."""

    model_config = ConfigDict(extra="forbid")

    target_count: int = Field(64, ge=1)
    data: Literal["filtered", "unfiltered", "seeds_only"] = "filtered"
    """``filtered``: real + synthetic inputs that pass ``filter``; ``unfiltered``: real + all
    synthetic; ``seeds_only``: the real inputs alone (the ablations)."""
    filter: Literal["discriminator", "excess"] = "discriminator"
    """``discriminator``: a yes/no LoRA on the old base tells task inputs from its own free text
    (Trans-LoRA); ``excess``: no training, ``excess_pool`` x ``target_count`` inputs are
    synthesised and the ``target_count`` where the old adapter changes the old base's answer
    most are kept (TiTok's contrastive excess, ``migrate.excess``)."""
    excess_pool: float = Field(2.0, ge=1, le=8)
    discriminator_negatives: Literal["unprompted", "task_prompted"] = "unprompted"
    """What the discriminator learns to reject: the old base's unprompted text (off-task text
    only), or what the generator writes when asked for task inputs, as in the Trans-LoRA paper
    (a poor attempt at a task input too; drawn with another seed than the synthesis it then
    filters). ``unprompted`` stays the default until a committed run shows the other pays."""
    discriminator_calibration: bool = False
    """Hold a quarter of the discriminator's texts out and keep synthetic inputs above the
    threshold that separates them best (``migrate.discriminator.Calibration``); off: train on
    all of them, keep p(yes) > p(no). Off by default until it pays on held-out accuracy."""
    frame_synthesis: bool = False
    """Leave the real inputs' shared first and last lines (a task's instructions, its answer
    cue) out of the generator's prompts and put them back around each new input. Off by
    default until it pays on held-out accuracy (not measured on the real tasks yet)."""
    synthesis_ends_at_options: bool = False
    """Cut a generated BBH multiple-choice input just after its options block. Off, a
    generation is kept only if it stops there by itself, which the 135M generator seldom does
    (disambiguation_qa: 2 of 64 kept). On, it kept 34 / 7 (seeds 0 / 1), and the students
    scored 0.60 / 0.49 against 0.56 / 0.55 and agreed less with the teacher on the real gate
    inputs (23 / 19 of 32 against 28 / 28): a weak generator's inputs cost more than they
    teach, so off by default until a stronger generator shows it pays."""
    gate_fraction: float = Field(0.25, gt=0, lt=1)
    gate_synthetic: int = Field(20, ge=0)
    """Synthetic inputs kept out of the student's training and checked at the gate (agreement
    with the teacher), at most half of those kept: a handful of real inputs tells little."""
    gate_tolerance: float = Field(0.05, ge=0, le=1)
    gate_min_agreement: float = Field(0.8, ge=0, le=1)
    gate_min_known: int = Field(MIN_KNOWN, ge=1)
    """Known answers needed before the task metric decides instead of agreement."""
    gate_min_checked: int = Field(MIN_CHECKED, ge=1)
    """Held-out inputs needed before agreement with the teacher decides; fewer: refused."""
    synthesis: SynthesisParams = Field(default_factory=SynthesisParams)
    discriminator: TrainParams = Field(default_factory=lambda: TrainParams(lr=5e-3))
    student: TrainParams = Field(default_factory=_student)
    student_soup: int = Field(1, ge=1, le=8)
    """K > 1: K students (one LoRA init from ``seed``, batch orders ``seed`` onwards) and the
    adapter is the mean of their deltas, cut back to ``student.rank`` (a model soup,
    ``migrate.soup``), to average out what one student's batch order decided. Costs K
    trainings; off until a committed migration run shows it pays
    (``benchmarks/migration_quality.py --student-soup 3``)."""
    student_epochs: float | None = Field(8.0, gt=0, le=100)
    """A budget in epochs over the student's distinct training inputs: ``student.steps``
    becomes ceil(epochs x inputs / batch) (an input's ``soft_label_draws`` count once), with
    the student's warmup and decay over those steps (the source adapters are trained so).
    None: ``student.steps`` as given. 8: on the real inputs of three BBH tasks, students of
    the teacher's labels stopped improving by ~7 epochs (``docs/migration.md``, "At the
    budget a student can spend")."""
    student_fit: float = Field(0.0, ge=0, le=1)
    """Training ends once the student's greedy answer equals its label on this fraction of its
    training rows (checked every 10 steps), or when the budget runs out; 0 (the default): the
    whole budget. Stopped once they fit (0.9), students trained 80-140 steps and lost a fifth
    of the source's accuracy."""
    distillation: Literal["sequence", "token_kl"] = "sequence"
    """``sequence``: cross-entropy on the teacher's answer text (works across tokenizers);
    ``token_kl``: KL to the teacher's top-``teacher_top_k`` distribution at every answer token
    (the same tokenizer on both bases only)."""
    votes: int = Field(4, ge=0, le=16)
    """Sampled teacher answers per free-form input besides the greedy one: the answer most of
    them agree on is the label, and an input with less than ``vote_agreement`` of the answers
    behind one answer is dropped. 0: the greedy answer is the label. 4 by default: on the
    generated arithmetic task's real train inputs the voted labels were right on 0.95 of the
    89% kept (greedy: 0.86 of all), and a student trained on them scored 0.66 held-out against
    0.61 (``benchmarks/results/migration_ceilings.json``)."""
    vote_temperature: float = Field(0.7, gt=0, le=2)
    vote_agreement: float = Field(0.5, gt=0, le=1)
    vote_weights: bool = False
    """Free-form: each teacher-labelled training input's loss is weighted by its vote
    agreement (a seed's known answer by 1), so an answer few votes back teaches less instead
    of as much or nothing; with a low ``vote_agreement``, the inputs it would drop are kept at
    their low weight. Off: on BBH object_counting a ceiling student of all the weighted votes
    scored 0.38 against 0.31 dropping those under half (``migration_ceilings.json``), but the
    migrations with it scored 0.30 / 0.28 against the defaults' 0.31 / 0.29
    (``migration_quality_weighted_votes.json``)."""
    choice_confidence: float = Field(0.0, ge=0, lt=1)
    """A multiple-choice training input is dropped when the teacher gives its chosen option a
    probability (among the listed options) below this; seeds keep their answers and the gate
    sees every label. 0: none dropped. The teacher's doubt is the multiple-choice analogue of
    votes that disagree. Off by default: on BBH disambiguation_qa's train inputs the options
    given p >= 0.6 were right on 0.85 (all: 0.73), yet a student trained on them scored 0.48
    held-out against 0.60 on all labels (``benchmarks/results/migration_ceilings.json``): the
    doubted inputs are the hard ones, and dropping them loses what they teach."""
    soft_label_draws: int = Field(0, ge=0, le=16)
    """Multiple choice: each teacher-labelled training input appears this many times, each with
    an option drawn (seeded) from the teacher's probabilities over its options, so the student
    learns how sure the teacher is, not its argmax alone (an input it doubts teaches both
    options); no shared tokenizer needed. Seeds keep their one answer. 0: the most likely
    option, once. Off: on BBH disambiguation_qa a student of 4 draws per input scored 0.58
    held-out against 0.60 on the most likely options (paired -0.02 [-0.11, +0.07];
    ``benchmarks/results/migration_ceilings.json``)."""
    teacher_top_k: int = Field(20, ge=1, le=20)
    """20 is vLLM's default ``--max-logprobs``, the most a served teacher returns."""
    answer_max_tokens: int = Field(64, ge=1)
    sampling: Literal["batched", "seeded"] = "batched"
    """How a served model samples (synthesis, negatives, votes). ``batched``: without seeds, in
    batched requests, as the quality benchmark measured; ``seeded``: reproducible, but vLLM
    applies a request's seed to all its prompts, so one request per prompt: on a server that is
    also answering traffic each waits in line (the discriminator's 136 negatives took 27
    minutes of a hot upgrade on this CPU)."""
    max_len: int = Field(256, ge=8)
    seed: int = 0


class MigrationSpec(MigrationOptions):
    """Everything a migration needs to know besides the models (validated on construction)."""

    adapter: str = Field(min_length=1)
    task_description: str = Field(min_length=1)
    """Completes "Here are N examples of ..." and "Is the above question from ...?"."""
    seeds: list[Seed] = Field(default_factory=list)
    reservoir: list[str] = Field(default_factory=list)
    """Prompts the adapter was observed to serve (user-turn text)."""
    choice_prefix: str | None = Field(None, min_length=1)
    """Set for multiple-choice tasks whose inputs list their options, each after this marker
    (BIG-bench's ``"\n  choice: "``), or BBH's ``"\nOptions:\n"`` block (answers ``(A)`` or the
    ``- `` texts): the teacher then labels an input with the option it finds most likely, and
    an input without two options is not used."""

    @model_validator(mode="after")
    def _enough_examples(self) -> MigrationSpec:
        n = len(real_inputs(self))
        if n < MIN_EXAMPLES:
            raise ValueError(
                f"migrating {self.adapter!r} needs at least {MIN_EXAMPLES} distinct example "
                f"inputs (seeds or reservoir prompts): one is held out to check the result, the "
                f"rest seed the synthesis; got {n}"
            )
        return self


def real_inputs(spec: MigrationSpec) -> list[tuple[str, str | None]]:
    """Seeds then reservoir prompts as (input, known output), without repeats."""
    out: dict[str, tuple[str, str | None]] = {}
    for text, target in [(s.input, s.output) for s in spec.seeds] + [
        (r, None) for r in spec.reservoir
    ]:
        if text.strip():
            out.setdefault(dedupe_key(text), (text.strip(), target))
    return list(out.values())


def split_real(spec: MigrationSpec) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(gate examples, inputs to learn from): a seeded shuffle, never overlapping.

    The gate holds ``gate_fraction`` of the real inputs. Known answers are its best evidence
    (with enough of them the task metric decides, not agreement with a teacher that may be
    wrong), so half of the seeds with an output (rounded up) go to the gate first; observed
    inputs fill the rest. Without known answers this is a plain seeded split.
    """
    pool = real_inputs(spec)
    random.Random(spec.seed).shuffle(pool)
    n_gate = min(max(1, round(spec.gate_fraction * len(pool))), len(pool) - 2)
    known = [i for i, (_, y) in enumerate(pool) if y is not None]
    first = known[: min((len(known) + 1) // 2, n_gate)]
    taken = set(first)
    rest = [i for i in range(len(pool)) if i not in taken]
    chosen = set(first + rest[: n_gate - len(first)])
    gate = [pool[i] for i in range(len(pool)) if i in chosen]
    return gate, [x for i, (x, _) in enumerate(pool) if i not in chosen]
