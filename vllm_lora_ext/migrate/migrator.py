"""One migration as a resumable job: synthesise -> filter -> label -> distil -> gate.

Each finished step writes its typed output (:mod:`~vllm_lora_ext.migrate.checkpoints`) to
``<work_dir>/<step>.json`` atomically; a later :meth:`Migrator.run` on the same directory (and
spec) validates those back into their records and starts at the first missing step, so an
interrupted or cancelled job never pays twice for generation or training. ``run()`` is
synchronous and blocking: an async HTTP route drives it with ``await asyncio.to_thread(m.run)``,
polls ``m.progress`` (a snapshot, safe from another thread) and calls ``m.cancel()`` (checked
between batches and training steps). Switching the served adapter is the caller's business:
``run()`` only returns the new adapter's directory and the gate's verdict.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.bbh import OPTIONS_HEADER, options_block_end
from vllm_lora_ext.migrate.checkpoints import (
    SCHEMAS,
    CheckpointInvalid,
    DiscriminatorOutput,
    DiscriminatorSkipped,
    DiscriminatorTrained,
    DistilOutput,
    LabelOutput,
    SoupRecord,
    StepOutputs,
    StudentRecord,
    SynthesisOutput,
    read_checkpoint,
    write_checkpoint,
    write_json,
)
from vllm_lora_ext.migrate.discriminator import (
    discriminator_filter,
    sample_negatives,
    train_discriminator,
)
from vllm_lora_ext.migrate.distill import CARD_FILE, distil
from vllm_lora_ext.migrate.excess import excess_scores, top_by_excess
from vllm_lora_ext.migrate.gate import GateResult, decide
from vllm_lora_ext.migrate.labelling import (
    LabellingStopped,
    VoteParams,
    answer_all,
    answer_lines,
    label_all,
    lists_options,
    parse_options,
    soft_draws,
)
from vllm_lora_ext.migrate.queries import tokenizer_mismatch
from vllm_lora_ext.migrate.soup import save_soup
from vllm_lora_ext.migrate.spec import MigrationSpec, TrainParams, real_inputs, split_real
from vllm_lora_ext.migrate.synthesis import (
    Accept,
    InputEnd,
    Synthesis,
    SynthesisCounts,
    synthesise,
)
from vllm_lora_ext.training import TrainingDiverged, TrainingStopped

STEPS = tuple(SCHEMAS)
"""discriminator, synthesise, label, distil, gate: each writes ``<step>.json``."""
SPEC_FILE = "spec.json"
DISCRIMINATOR_DIR = "discriminator"
STUDENT_DIR = "adapter"
NEGATIVES_SEED_OFFSET = 7919
"""Task-prompted negatives are drawn from ``seed + this``: never the synthesis's own draws."""
CANDIDATES_FILE = "candidates.json"
"""Every synthetic candidate the filter saw: text, kept, the discriminator's margin."""

# adapter directory -> a backend serving (base + that adapter)
BackendFactory = Callable[[Path], Backend]
T = TypeVar("T")


class MigrationError(RuntimeError):
    """The job failed; the message says at which step and why."""


class MigrationCancelled(MigrationError):
    pass


@dataclass
class MigrationProgress:
    state: Literal["pending", "running", "done", "failed", "cancelled"] = "pending"
    step: str | None = None
    completed: list[str] = field(default_factory=list)
    from_checkpoint: list[str] = field(default_factory=list)
    """Of ``completed``, the steps taken from a checkpoint of an earlier run, not redone."""
    generated: int = 0
    kept: int = 0
    rejected: int = 0
    labelled: int = 0
    train_step: int = 0
    train_steps: int = 0
    loss: float | None = None
    gate: GateResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class MigrationResult:
    adapter_dir: Path
    steps: StepOutputs
    """What each step produced (synthesis counts, labels, final losses, the gate's verdict)."""

    @property
    def gate(self) -> GateResult:
        return self.steps.gate

    @property
    def passed(self) -> bool:
        return self.gate.passed

    @property
    def counts(self) -> dict[str, Any]:
        """Per step, its output as its checkpoint holds it (JSON)."""
        return self.steps.as_json()


class Migrator:
    """Runs one :class:`MigrationSpec` in ``work_dir``.

    ``generator`` writes synthetic inputs (the old base, or the new one), ``teacher`` serves
    the old base + old adapter, ``old_base_backend`` the old base alone for scoring (the excess
    filter; default: ``generator``, which must then be the old base). The discriminator
    and the student are trained in process from ``old_base`` / ``new_base`` (model folders) and
    scored through ``discriminator_backend`` / ``student_backend`` (default: transformers in
    process; a server route can load the adapter into a server and return an HTTP backend).
    """

    def __init__(
        self,
        spec: MigrationSpec,
        work_dir: Path,
        *,
        old_base: Path,
        new_base: Path,
        generator: Backend,
        teacher: Backend,
        discriminator_backend: BackendFactory | None = None,
        student_backend: BackendFactory | None = None,
        old_base_backend: Backend | None = None,
    ) -> None:
        self.spec = spec
        self.work_dir = Path(work_dir)
        self.old_base, self.new_base = Path(old_base), Path(new_base)
        self.generator, self.teacher = generator, teacher
        self.old_base_backend = old_base_backend or generator
        self._disc_backend = discriminator_backend or _local(self.old_base)
        self._student_backend = student_backend or _local(self.new_base)
        self._progress = MigrationProgress()
        self._lock = threading.Lock()
        self._running = threading.Lock()
        self._cancel = threading.Event()

    @property
    def progress(self) -> MigrationProgress:
        """A copy, consistent at one instant; safe to read from another thread."""
        with self._lock:
            return copy.deepcopy(self._progress)

    def cancel(self) -> None:
        """Stop the running job at its next check; a later :meth:`run` resumes."""
        self._cancel.set()

    def run(self) -> MigrationResult:
        """Run (or resume) every step; raises :class:`MigrationError` on failure or cancel."""
        if not self._running.acquire(blocking=False):
            raise MigrationError("this migration is already running")
        try:
            self._cancel.clear()
            self._update(state="running", error=None, completed=[], from_checkpoint=[])
            self._claim_work_dir()
            self._check_distillation()
            discriminator = self._step("discriminator", self._discriminator)
            synthesis = self._step("synthesise", lambda: self._synthesise(discriminator))
            labels = self._step("label", lambda: self._label(synthesis))
            student = self._step("distil", lambda: self._distil(labels))
            gate = self._step("gate", lambda: self._gate(labels))
            self._update(state="done", step=None, gate=gate)
            steps = StepOutputs(discriminator, synthesis, labels, student, gate)
            return MigrationResult(self.work_dir / STUDENT_DIR, steps)
        except MigrationCancelled as e:
            self._update(state="cancelled", error=str(e))
            raise
        except Exception as e:
            self._update(state="failed", error=str(e))
            raise
        finally:
            self._running.release()

    # -- steps ------------------------------------------------------------------------------

    def _step(self, step: str, run: Callable[[], T]) -> T:
        """The step's output: from its checkpoint if there is one, else run and checkpointed."""
        saved: T | None = self._checkpoint(step)
        out = saved if saved is not None else self._run_step(step, run)
        with self._lock:
            self._progress.completed.append(step)
            if saved is not None:
                self._progress.from_checkpoint.append(step)
        return out

    def _run_step(self, step: str, run: Callable[[], T]) -> T:
        self._update(step=step)
        try:
            out = run()
        except (TrainingStopped, LabellingStopped) as e:
            raise MigrationCancelled(f"cancelled during {step}: {e}") from e
        except TrainingDiverged as e:
            raise MigrationError(f"{step} training diverged: {e}") from e
        write_checkpoint(self.work_dir, step, out)  # kept even if cancelled just now
        self._check_cancel(step)
        return out

    def _filter(self) -> str | None:
        """Which filter synthetic inputs go through, if any."""
        return self.spec.filter if self.spec.data == "filtered" else None

    def _discriminator(self) -> DiscriminatorOutput:
        if self._filter() != "discriminator":
            return DiscriminatorSkipped()
        _, positives = split_real(self.spec)
        count = max(len(positives), 8)
        if self.spec.discriminator_negatives == "task_prompted":
            negatives = self._task_prompted_negatives(positives, count)
        else:
            negatives = sample_negatives(
                self.generator,
                count=count,
                seed=self.spec.seed,
                max_tokens=self.spec.synthesis.max_tokens,
                exclude=positives,
            )
        self._check_cancel("discriminator")
        if not negatives:
            raise MigrationError("the old base generated no usable negatives for the discriminator")
        hp = self.spec.discriminator.hyperparameters(self.spec.seed)
        losses, calibration = train_discriminator(
            self.old_base,
            self.spec.task_description,
            positives,
            negatives,
            hp,
            self.work_dir / DISCRIMINATOR_DIR,
            self.spec.max_len,
            on_step=self._on_train_step(hp.steps),
            should_stop=self._cancel.is_set,
            calibrate=self.spec.discriminator_calibration,
        )
        return DiscriminatorTrained(positives=len(positives), negatives=len(negatives),
                                    final_loss=losses[-1], steps_run=len(losses),
                                    calibration=calibration)  # fmt: skip

    def _task_prompted_negatives(self, positives: list[str], count: int) -> list[str]:
        """The generator's attempts at task inputs, unfiltered (the paper's negatives), drawn
        with a seed the later synthesis does not use, so the filter is judged on new texts."""
        real = set(map(str.strip, positives))
        drawn = self._draw_inputs(positives, count, self.spec.seed + NEGATIVES_SEED_OFFSET)
        return [x for x in drawn.inputs if x.strip() not in real][:count]

    def _draw_inputs(
        self,
        examples: list[str],
        count: int,
        seed: int,
        accept: Accept | None = None,
        on_round: Callable[[SynthesisCounts], None] | None = None,
    ) -> Synthesis:
        """New task inputs from the generator, with the spec's synthesis settings."""
        p = self.spec.synthesis
        return synthesise(
            self.generator,
            self.spec.task_description,
            examples,
            count=count,
            max_attempts=count * p.attempts_per_input,
            seed=seed,
            shots=p.shots,
            batch=p.batch,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            frame=self.spec.frame_synthesis,
            well_formed=self._well_formed(),
            input_end=self._input_end(),
            accept=accept,
            on_round=on_round,
            should_stop=self._cancel.is_set,
            give_up_after=p.give_up_after,
        )

    def _synthesise(self, discriminator: DiscriminatorOutput) -> SynthesisOutput:
        _, real = split_real(self.spec)
        if self.spec.data == "seeds_only":
            return SynthesisOutput(inputs=[], counts=SynthesisCounts())
        accept = None
        count = self.spec.target_count
        if isinstance(discriminator, DiscriminatorTrained):
            backend = self._disc_backend(self.work_dir / DISCRIMINATOR_DIR)
            threshold = discriminator.threshold
            accept = discriminator_filter(backend, self.spec.task_description, threshold)
        elif self._filter() == "excess":  # a pool to rank once labelled
            count = round(count * self.spec.excess_pool)
        result = self._draw_inputs(real, count, self.spec.seed, accept, self._on_round)
        self._check_cancel("synthesise")
        if accept is not None:
            audit = [{"text": t, "kept": k, "score": accept.scores.get(t)}
                     for t, k in result.candidates]  # fmt: skip
            write_json(self.work_dir / CANDIDATES_FILE, audit)
        fallback = None
        if not result.inputs:
            # The observed inputs carry most of what a student learns (a migration from them
            # alone scored as well as one with synthetic inputs: migration_quality_traffic64),
            # so a generator that cannot write the task's format costs the synthetic rows, not
            # the migration. The gate still decides.
            c = result.counts
            fallback = (
                f"no synthetic input survived after {c.generated} generations ({c.unparsable} "
                f"unparsable, {c.duplicates} duplicates, {c.rejected} rejected by the filter): "
                f"the student learns from the {len(real)} observed inputs alone"
            )
        return SynthesisOutput(inputs=result.inputs, counts=result.counts, fallback=fallback)

    def _well_formed(self) -> Callable[[str], bool] | None:
        """A multiple-choice input must list two options the teacher can choose from."""
        prefix = self.spec.choice_prefix
        if prefix is None:
            return None
        return lambda text: lists_options(parse_options(text, prefix))

    def _input_end(self) -> InputEnd | None:
        """With ``synthesis_ends_at_options``, a BBH multiple-choice input ends with its options
        block: a generation is cut there."""
        if self.spec.choice_prefix != OPTIONS_HEADER or not self.spec.synthesis_ends_at_options:
            return None
        return options_block_end

    def _label(self, synthesis: SynthesisOutput) -> LabelOutput:
        """Labels for training and gate. A seed's known answer is its label; everything else
        is labelled by the teacher. Some synthetic inputs are held out for the gate."""
        gate, real = split_real(self.spec)
        known = {x: y for x, y in real_inputs(self.spec) if y is not None}
        synthetic = synthesis.inputs
        asked = [x for x in real if x not in known] + synthetic + [x for x, _ in gate]
        s = self.spec
        labels = label_all(
            self.teacher,
            asked,
            s.answer_max_tokens,
            s.choice_prefix,
            VoteParams(s.votes, s.vote_temperature, s.vote_agreement, s.seed),
            answer_lines(list(known.values())),
            on_chunk=lambda done: self._update(labelled=done),
            should_stop=self._cancel.is_set,
        )
        by_input = dict(zip(asked, labels, strict=True))
        answers = {x: label.text for x, label in by_input.items()}
        # A label the teacher doubts is no label to learn from (the gate still compares it).
        doubted = {
            x
            for x, label in by_input.items()
            if s.choice_prefix is not None and label.agreement < s.choice_confidence
        }
        pool = len(synthetic)
        if self._filter() == "excess":
            synthetic = self._select_by_excess(synthetic, answers)
        # The gate's synthetic inputs are taken from the labelled ones (an input the teacher
        # was unsure of checks nothing), the last of them, so it gets all it was promised.
        labelled = [x for x in synthetic if answers[x] is not None]
        n_held = min(self.spec.gate_synthetic, len(labelled) // 2)
        held = labelled[len(labelled) - n_held :]
        held_set = set(held)
        inputs = real + [x for x in synthetic if x not in held_set]
        gate = [*gate, *((x, None) for x in held)]
        train = [
            (x, known[x] if x in known else None if x in doubted else answers[x]) for x in inputs
        ]
        rows = [(x, y) for x, y in train if y is not None]
        weights = None
        if s.vote_weights and s.choice_prefix is None:
            weights = [1.0 if x in known else by_input[x].agreement for x, _ in rows]
        if s.soft_label_draws and s.choice_prefix is not None:
            rng = random.Random(s.seed)
            rows = [
                (x, drawn)
                for x, y in rows
                for drawn in (
                    soft_draws(by_input[x], s.soft_label_draws, rng) if x not in known else [y]
                )
            ]
        return LabelOutput(
            train=rows,
            gate=[(x, a, y) for x, y in gate if (a := answers[x]) is not None],
            seed_answers=sum(x in known for x in inputs),
            unlabelled=sum(y is None for _, y in train),
            doubted=sum(x in doubted for x in inputs if x not in known),
            gate_synthetic=n_held,
            truncated=sum(label.truncated for label in labels),
            agreement=[round(label.agreement, 3) for label in labels],
            synthetic_pool=pool,
            synthetic_kept=len(synthetic),
            weights=weights,
        )

    def _select_by_excess(self, synthetic: list[str], answers: dict[str, str | None]) -> list[str]:
        """The ``target_count`` labelled synthetic inputs with the largest contrastive excess;
        every candidate's score goes to the audit file."""
        labelled = [x for x in synthetic if answers[x] is not None]
        scores = excess_scores(self.old_base_backend, self.teacher, labelled,
                               [answers[x] or "" for x in labelled])  # fmt: skip
        kept = top_by_excess(labelled, scores, self.spec.target_count)
        by_text = dict(zip(labelled, scores, strict=True))
        chosen = set(kept)
        audit = [{"text": x, "kept": x in chosen, "score": by_text.get(x)} for x in synthetic]
        write_json(self.work_dir / CANDIDATES_FILE, audit)
        self._update(kept=len(kept), rejected=len(synthetic) - len(kept))
        return kept

    def _distil(self, labels: LabelOutput) -> DistilOutput:
        """One student, or with ``student_soup`` = K the mean of K students' deltas (one init,
        batch orders ``seed`` onwards), cut back to the student rank. A member already trained
        by an interrupted run is reused."""
        k = self.spec.student_soup
        members = []
        for i in range(k):
            out = self.work_dir / (STUDENT_DIR if k == 1 else f"{STUDENT_DIR}-{i}")
            if k > 1 and (out / CARD_FILE).is_file():
                card = json.loads((out / CARD_FILE).read_text())
                members.append(StudentRecord.from_card(card, seed_offset=i))
                continue
            # One LoRA init for all, the batch order by member: deltas grown from unlike inits
            # lie in unlike subspaces, and their mean cut back to one rank loses much of each
            # (on the tiny models of tests/integration/test_hot_upgrade.py such a soup failed
            # the gate, 0.44 against the teacher's 0.89; with one init it passes).
            hp = self._student_params(len({x for x, _ in labels.train})).hyperparameters(
                self.spec.seed, order_seed=self.spec.seed + i
            )
            result = distil(
                self.new_base,
                labels.train,
                hp,
                out,
                self.spec.max_len,
                on_step=self._on_train_step(hp.steps),
                should_stop=self._cancel.is_set,
                teacher=self.teacher if self.spec.distillation == "token_kl" else None,
                top_k=self.spec.teacher_top_k,
                fit_target=self.spec.student_fit or None,
                weights=labels.weights,
            )
            members.append(StudentRecord(rows=result.rows, too_long=result.too_long,
                                         final_loss=result.losses[-1],
                                         steps_run=len(result.losses), fit=result.fit,
                                         seed_offset=i))  # fmt: skip
        soup = None
        if k > 1:
            dirs = [self.work_dir / f"{STUDENT_DIR}-{i}" for i in range(k)]
            cut = save_soup(dirs, self.work_dir / STUDENT_DIR, self.spec.student.rank)
            soup = SoupRecord(members=members, **cut)
        first = members[0]
        return DistilOutput(
            rows=first.rows,
            too_long=first.too_long,
            final_loss=first.final_loss,
            distillation=self.spec.distillation,
            steps_run=first.steps_run,
            fit=first.fit,
            soup=soup,
        )

    def _student_params(self, inputs: int) -> TrainParams:
        """The student's training parameters, its steps from ``student_epochs`` when set:
        epochs over its distinct training inputs, so that an input's soft draws are one input
        seen with a label drawn per pass, not more passes (the same budget with or without
        ``soft_label_draws``, and the label alone differs)."""
        params = self.spec.student
        if self.spec.student_epochs is None:
            return params
        steps = max(1, math.ceil(self.spec.student_epochs * inputs / params.batch))
        return params.model_copy(update={"steps": steps})

    def _gate(self, labels: LabelOutput) -> GateResult:
        held = labels.gate
        student = self._student_backend(self.work_dir / STUDENT_DIR)
        inputs = [x for x, _, _ in held]
        chosen: list[str | None] = [None] * len(inputs)
        if self.spec.choice_prefix is not None:
            # Scored as the teacher was labelled and as multiple choice is scored: the option
            # it finds most likely. Judged on its generated wording instead, a student that
            # picks the right option could be refused for saying it another way.
            labels = label_all(student, inputs, choice_prefix=self.spec.choice_prefix,
                               should_stop=self._cancel.is_set)  # fmt: skip
            chosen = [label.text for label in labels]
        free = [x for x, c in zip(inputs, chosen, strict=True) if c is None]
        generated = iter(
            answer_all(student, free, self.spec.answer_max_tokens, should_stop=self._cancel.is_set)
        )
        answers = [c if c is not None else next(generated) for c in chosen]
        result = decide(
            [a for _, a, _ in held],
            answers,
            [y for _, _, y in held],
            self.spec.gate_tolerance,
            self.spec.gate_min_agreement,
            self.spec.gate_min_known,
            self.spec.gate_min_checked,
        )
        self._update(gate=result)
        return result

    # -- plumbing ---------------------------------------------------------------------------

    def _check_distillation(self) -> None:
        """Token-level KL needs one tokenizer on both bases: refuse before any work."""
        if self.spec.distillation != "token_kl":
            return
        from transformers import AutoTokenizer

        student = AutoTokenizer.from_pretrained(self.new_base)
        why = tokenizer_mismatch(self.teacher.tokenizer, student)
        if why is not None:
            raise MigrationError(f"token-level distillation is not possible here: {why}")

    def _claim_work_dir(self) -> None:
        """Bind ``work_dir`` to this spec; checkpoints of another spec must not be reused."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / SPEC_FILE
        mine = self.spec.model_dump(mode="json")
        if path.exists():
            if _saved_spec(path) != self.spec:
                raise MigrationError(
                    f"{self.work_dir} holds checkpoints of a different migration spec; "
                    "use a fresh work directory"
                )
        else:
            write_json(path, mine)

    def _checkpoint(self, step: str) -> Any | None:
        """A finished step's output, if its checkpoint (and any adapter it made) exists."""
        try:
            out = read_checkpoint(self.work_dir, step)
        except CheckpointInvalid as e:
            raise MigrationError(f"{e}; use a fresh work directory") from e
        needs = {"discriminator": DISCRIMINATOR_DIR, "distil": STUDENT_DIR}.get(step)
        if out is None or isinstance(out, DiscriminatorSkipped):
            return out
        if needs and not (self.work_dir / needs).is_dir():
            return None
        if isinstance(out, SynthesisOutput):
            self._on_round(out.counts)
        elif isinstance(out, LabelOutput):
            self._update(labelled=len(out.train) + len(out.gate))
        return out

    def _check_cancel(self, step: str) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled(f"cancelled during {step}")

    def _on_round(self, c: SynthesisCounts) -> None:
        self._update(generated=c.generated, kept=c.kept, rejected=c.rejected)

    def _on_train_step(self, total: int) -> Callable[[int, float], None]:
        """A progress hook for a training run that starts now (train_* show the latest run)."""
        self._update(train_step=0, train_steps=total, loss=None)

        def report(step: int, loss: float) -> None:
            self._update(train_step=step, train_steps=total, loss=loss)

        return report

    def _update(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self._progress, name, value)


def _local(base: Path) -> BackendFactory:
    def make(adapter_dir: Path) -> Backend:
        from vllm_lora_ext.evaluation.backends import TransformersBackend

        return TransformersBackend.from_pretrained(base, adapter_dir)

    return make


def _saved_spec(path: Path) -> MigrationSpec | None:
    """The spec a work dir was claimed for, compared as a spec (not as JSON), so a field added
    since, at its default, still matches; ``None`` if it no longer validates."""
    try:
        return MigrationSpec.model_validate(json.loads(path.read_text()))
    except ValueError:
        return None
