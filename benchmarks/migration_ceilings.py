"""What the target base can reach on each task: the ceilings a migration is measured against.

    python benchmarks/migration_ceilings.py            # the committed run (~1 h, 1 thread)
    python benchmarks/migration_ceilings.py --quick    # smoke run: tiny Llama -> tiny Gemma 3

Per task adapter in ``adapters/SmolLM2-135M-Instruct/``, on the same first ``--limit`` held-out
examples (framed as the migration's student sees them, ``migrate.queries.query_prompt``):

* ``source``: SmolLM2 + the task adapter (the teacher), in process;
* ``target_base``: Gemma 3 270M base, zero-shot;
* ``three_shot`` (ceiling c): Gemma base with 3 solved train examples before the question;
* ``true_labels`` (ceiling a): Gemma + a LoRA trained on the real train inputs with their true
  answers, at the source adapters' budget (``--steps`` x ``--batch`` rows, ``--lr``, rank 8);
* ``teacher_labels`` (ceiling b): the same inputs and budget, answers from the teacher (greedy
  generation; on multiple-choice tasks the option the teacher finds most likely). The teacher's
  accuracy on those inputs is recorded: it is the label noise.
* ``voted_labels`` (ceiling b, voted): on free-form tasks the teacher answers each input
  ``--votes`` more times by sampling, the majority answer is the label and inputs without a
  majority are dropped (``migrate.labelling.vote_all``); on multiple choice, inputs whose option
  the teacher gives less than ``--choice-confidence`` probability are dropped. The label
  accuracy and the share of inputs kept are recorded: does a surer teacher buy cleaner labels,
  and at what coverage?
* ``soft_labels`` (ceiling b, multiple choice only): every input appears ``--soft-draws`` times,
  each with an option drawn from the teacher's probabilities over the options, so the student
  learns how sure the teacher is (an input it doubts teaches both options) instead of its
  argmax alone, at the same budget.

``--seed`` seeds the students' LoRA init and batch order (and the soft draws): a replicate.
``--soup K`` trains every student row K times (batch orders ``--seed`` onwards, one LoRA init;
``--soup-init own``: each its own init too), scores each, and scores the mean of their LoRA
deltas as the row (``members`` keeps each student's score).

Between them these rows separate what a migration loses to synthetic inputs (migrated vs b), to
the teacher's labels (b vs a) and to the student's capacity at this budget (a vs the source).
Writes ``benchmarks/results/migration_ceilings.json`` and ``.png`` (95% Wilson intervals).
Every step is cached under ``<cache dir>/migration_ceilings``, so a re-run resumes.

``--quick``: the tiny test Llama with a random "task" adapter (the teacher) and the tiny test
Gemma 3 on two synthetic tasks (``benchmarks/quick.py``; one generated, one multiple choice),
tiny counts, in a scratch cache; written to ``<tmp>/migration_ceilings_quick/`` unless ``--out``
says otherwise. A random teacher's votes rarely agree: the voted ceiling may have no labels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import quick
from migration_quality import DEFAULT_ADAPTERS, DEFAULT_TASKS, QUICK_TASKS

ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "source", "target_base", "three_shot", "true_labels", "teacher_labels", "voted_labels",
    "weighted_labels", "soft_labels",
)  # fmt: skip
LABELS = {
    "source": "source (SmolLM2 + adapter)",
    "target_base": "Gemma 3 base, 0-shot",
    "three_shot": "(c) Gemma base, 3-shot",
    "true_labels": "(a) Gemma + LoRA, true labels",
    "teacher_labels": "(b) Gemma + LoRA, teacher labels",
    "voted_labels": "(b) with voted labels",
    "weighted_labels": "(b) with every voted label, weighted by its agreement",
    "soft_labels": "(b) with option labels drawn from the teacher",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS)
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=100, help="held-out examples scored per task")
    p.add_argument("--steps", type=int, default=60, help="the source adapters' budget")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of steps warming up")
    p.add_argument("--decay", action="store_true", help="cosine decay after the warmup")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="the student's")
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--votes", type=int, default=4, help="sampled teacher answers per input")
    p.add_argument(
        "--vote-agreement", type=float, default=0.5,
        help="share of the answers the majority needs, else the input is dropped",
    )  # fmt: skip
    p.add_argument(
        "--choice-confidence", type=float, default=0.6,
        help="multiple choice: probability the teacher's option needs, else the input is dropped",
    )  # fmt: skip
    p.add_argument(
        "--soft-draws", type=int, default=4, help="multiple choice: labels drawn per input"
    )
    p.add_argument("--seed", type=int, default=0, help="the students' init, order and draws")
    p.add_argument(
        "--soup", type=int, default=0,
        help="K >= 2: each trained row is K students (seeds --seed.. --seed+K-1), each scored, "
        "and the mean of their deltas scored as the row",
    )  # fmt: skip
    p.add_argument("--soup-rank", type=int, default=0, help="cut the soup to this rank; 0: K x r")
    p.add_argument(
        "--soup-init", choices=("shared", "own"), default="shared",
        help="shared: the members share --seed's LoRA init and differ in batch order (what a "
        "migration does); own: each member's seed sets its init and order",
    )  # fmt: skip
    p.add_argument("--rows", default=",".join(ROWS), help="the rows to compute (default: all)")
    p.add_argument("--name", default="migration_ceilings", help="the result files' stem")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny Llama -> tiny Gemma 3, two synthetic tasks, tiny counts",
    )
    p.add_argument("--cache", type=Path, help="default: <cache dir>/migration_ceilings")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if unknown := set(args.rows.split(",")) - set(ROWS):
        p.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    if args.quick:
        args.tasks = args.tasks if args.tasks != DEFAULT_TASKS else QUICK_TASKS
        args.limit, args.steps, args.batch = min(args.limit, 6), min(args.steps, 2), 2
        args.votes = min(args.votes, 2)
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("migration_ceilings")
    return args


def shots_prefix(task: Any, k: int) -> str:
    """``k`` solved train examples in ``Q: ... A: ...`` form; ``query_prompt`` adds the
    question's own ``Q:`` before this and ``A:`` after it."""
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.tasks import reference_answer

    return "".join(
        f"{user_message(task, e)}\nA: {reference_answer(task, e)}\n\nQ: " for e in task.train[:k]
    )


def voted_labels(task: Any, teacher: Any, examples: list, votes: int) -> list[dict]:
    """Every input's majority answer and its agreement, none dropped (the threshold is applied
    by the caller, so one cached vote serves every threshold)."""
    from vllm_lora_ext.evaluation.evaluate import generation_budget
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.migrate.labelling import VoteParams, vote_all

    inputs = [user_message(task, e) for e in examples]
    budget = generation_budget(task, teacher.tokenizer)
    labels = vote_all(teacher, inputs, budget, VoteParams(votes=votes, min_agreement=0.0))
    return [{"text": v.text, "agreement": v.agreement, "truncated": v.truncated} for v in labels]


def confident_labels(task: Any, teacher: Any, examples: list) -> list[dict]:
    """Multiple choice: the teacher's option for every input and the probability it gives it
    among the options (its doubt, as vote agreement is for free-form answers), none dropped."""
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.migrate.labelling import choose_all_with_confidence

    inputs = [user_message(task, e) for e in examples]
    chosen = choose_all_with_confidence(teacher, inputs, [e.options for e in examples])
    return [{"text": e.options[c], "agreement": p, "truncated": False}
            for (c, p), e in zip(chosen, examples, strict=True)]  # fmt: skip


def option_spread(task: Any, teacher: Any, examples: list) -> list[list[float]]:
    """Multiple choice: the teacher's probability for every option of every input."""
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.migrate.labelling import option_distributions

    inputs = [user_message(task, e) for e in examples]
    return option_distributions(teacher, inputs, [e.options for e in examples])


def soft_draws(
    task: Any, examples: list, spread: list[list[float]], draws: int, seed: int
) -> tuple[list, list[str]]:
    """Each example ``draws`` times, each time with an option drawn from ``spread`` (seeded)."""
    import random

    rng = random.Random(seed)
    repeated, labels = [], []
    for e, p in zip(examples, spread, strict=True):
        for option in rng.choices(e.options, weights=p, k=draws):
            repeated.append(e)
            labels.append(option)
    return repeated, labels


def teacher_labels(task: Any, teacher: Any, examples: list) -> list[str]:
    from vllm_lora_ext.evaluation.evaluate import generation_budget
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.migrate.labelling import answer_all, choose_all

    inputs = [user_message(task, e) for e in examples]
    if task.mode == "generate":
        return answer_all(teacher, inputs, generation_budget(task, teacher.tokenizer))
    choices = choose_all(teacher, inputs, [e.options for e in examples])
    return [e.options[c] for c, e in zip(choices, examples, strict=True)]


def train_student(
    args: argparse.Namespace,
    gemma_dir: Path,
    pairs: list,
    out: Path,
    seed: int,
    order_seed: int | None = None,
    weights: list[float] | None = None,
) -> dict:
    from vllm_lora_ext.migrate.distill import distil
    from vllm_lora_ext.training import LoraHyperparameters

    hp = LoraHyperparameters(
        rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets.split(",")),
        steps=args.steps, batch=args.batch, lr=args.lr, seed=seed, order_seed=order_seed,
        warmup=args.warmup, decay=args.decay,
    )  # fmt: skip
    start = time.perf_counter()
    d = distil(gemma_dir, pairs, hp, out, max_len=args.max_len, weights=weights)
    return {"rows": d.rows, "too_long": d.too_long, "final_loss": d.losses[-1],
            "train_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def vote_accuracy(voted: list[dict], train: list, args: argparse.Namespace, task: Any) -> dict:
    """How right the voted (multiple choice: confident) labels are on the train inputs, whose
    true answers are known, at the threshold and at every agreement level (multiple choice:
    every tenth of probability): does a surer teacher label better?"""
    from vllm_lora_ext.evaluation.scoring import exact_match, wilson_interval
    from vllm_lora_ext.evaluation.tasks import reference_answer

    choice = task.mode != "generate"

    def hit(text: str | None, e: Any) -> bool:
        if not text:
            return False
        return text == reference_answer(task, e) if choice else exact_match(text, e.targets)

    def level(a: float) -> float:
        return math.floor(a * 10) / 10 if choice else round(a, 3)

    threshold = args.choice_confidence if choice else args.vote_agreement
    right = [(v["agreement"], hit(v["text"], e)) for v, e in zip(voted, train, strict=True)]
    kept = [h for a, h in right if a >= threshold]
    levels = sorted({level(a) for a, _ in right})
    by_level = {}
    for lv in levels:
        hits = [h for a, h in right if level(a) == lv]
        by_level[f"{lv:.2f}"] = {"n": len(hits), "acc": sum(hits) / len(hits),
                                 "ci95": wilson_interval(sum(hits), len(hits))}  # fmt: skip
    return {
        "acc": sum(kept) / max(len(kept), 1), "n": len(kept),
        "ci95": wilson_interval(sum(kept), len(kept)),
        "coverage": len(kept) / len(train), "votes": None if choice else args.votes,
        "min_agreement": threshold, "by_agreement": by_level,
        "kind": "option probability" if choice else "vote agreement",
        "truncated": sum(v["truncated"] for v in voted),
    }  # fmt: skip


def run_task(args: argparse.Namespace, name: str, models: dict, root: Path) -> dict:
    from migration_quality import cached, framed_score, gemma_backend

    from vllm_lora_ext.evaluation.backends import TransformersBackend
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.scoring import exact_match, wilson_interval
    from vllm_lora_ext.evaluation.tasks import load_task, reference_answer
    from vllm_lora_ext.migrate.soup import save_soup

    card = json.loads((args.adapters / name / "card.json").read_text())
    task = load_task(name, seed=card["seed"])
    base = root / name
    train = list(task.train[: args.steps * args.batch])
    row: dict[str, Any] = {"task": name, "mode": task.mode, "train_inputs": len(train)}
    print(f"== {name} ({task.mode}), {len(train)} train inputs", flush=True)

    def timed(key: str, compute) -> dict:
        def run() -> dict:
            start = time.perf_counter()
            out = compute()
            return {**out, "seconds": round(time.perf_counter() - start, 1)}

        value = cached(base / f"{key}-{args.limit}.json", run)
        print(f"  {key}: {value['acc']:.3f} {value['ci95']}  ({value['seconds']} s)", flush=True)
        return value

    wanted = set(args.rows.split(","))
    row.update(dict.fromkeys([*ROWS, "teacher_label_acc", "voted_label_acc"]))
    teacher = TransformersBackend.from_pretrained(models["smol_dir"], args.adapters / name)
    gemma = gemma_backend(models["gemma_dir"])
    if "source" in wanted:
        row["source"] = timed("source", lambda: framed_score(task, teacher, args.limit))
    if "target_base" in wanted:
        row["target_base"] = timed("target_base", lambda: framed_score(task, gemma, args.limit))
    if "three_shot" in wanted:
        shots = shots_prefix(task, args.shots)
        row["three_shot"] = timed(
            f"three_shot{args.shots}", lambda: framed_score(task, gemma, args.limit, shots)
        )

    def budget(seed: int) -> str:
        schedule = (f"w{args.warmup}" if args.warmup else "") + ("cos" if args.decay else "")
        return f"s{args.steps}b{args.batch}lr{args.lr}r{args.rank}{schedule}" + (
            f"seed{seed}" if seed else ""
        )

    def student(
        key: str, pairs: list, seed: int, order: int | None = None, weights: list | None = None
    ) -> tuple[dict, Path]:
        """A student trained on ``pairs`` (each row's loss weighted by ``weights``, if given)
        with init ``seed`` and batch order ``order`` (default: ``seed``), scored (cached with
        its adapter)."""
        order = None if order == seed else order
        stem = f"{key}-{budget(seed)}" + ("" if order is None else f"order{order}")
        out = base / stem
        scored = base / f"{stem}-{args.limit}.json"
        if args.soup >= 2 and scored.exists() and not (out / "adapter_model.safetensors").exists():
            scored.unlink()  # the score outlived its adapter: a soup needs the adapter again

        def compute() -> dict:
            training = train_student(args, models["gemma_dir"], pairs, out, seed, order, weights)
            score = framed_score(task, gemma_backend(models["gemma_dir"], out), args.limit)
            return {**score, "training": training}

        return timed(stem, compute), out

    def ceiling(
        key: str,
        labels: list[str | None],
        examples: list | None = None,
        weights: list[float] | None = None,
    ) -> dict | None:
        examples = train if examples is None else examples
        pairs = [(user_message(task, e), y) for e, y in zip(examples, labels, strict=True) if y]
        if not pairs:  # every input dropped, e.g. no majority among a random teacher's votes
            print(f"  {key}: no labelled input, nothing to train", flush=True)
            return None
        if weights is not None:
            weights = [w for w, y in zip(weights, labels, strict=True) if y]
        if args.soup < 2:
            return student(key, pairs, args.seed, weights=weights)[0]
        seeds = range(args.seed, args.seed + args.soup)  # batch orders
        inits = list(seeds) if args.soup_init == "own" else [args.seed] * args.soup
        members = [
            student(key, pairs, i, order=s, weights=weights)
            for i, s in zip(inits, seeds, strict=True)
        ]
        tag = f"{key}-{budget(0)}-soup{seeds[0]}to{seeds[-1]}"
        tag += f"-rank{args.soup_rank}" if args.soup_rank else ""
        tag += "-owninit" if args.soup_init == "own" else ""

        def compute() -> dict:
            out = base / tag
            cut = save_soup([d for _, d in members], out, args.soup_rank or None)
            score = framed_score(task, gemma_backend(models["gemma_dir"], out), args.limit)
            return {**score, "soup": cut}  # its rank, and what the cut lost of the mean

        value = timed(tag, compute)
        kept = ("acc", "n", "correct", "ci95", "hits")
        scores = [
            {k: m[k] for k in kept} | {"seed": i, "order_seed": s}
            for (m, _), i, s in zip(members, inits, seeds, strict=True)
        ]
        return {**value, "members": scores}

    if "true_labels" in wanted:
        row["true_labels"] = ceiling("true_labels", [reference_answer(task, e) for e in train])
    if "teacher_labels" in wanted:
        labelled = cached(
            base / f"teacher-labels-{len(train)}.json",
            lambda: {"labels": teacher_labels(task, teacher, train)},
        )["labels"]
        if task.mode == "generate":
            hits = sum(exact_match(y, e.targets) for y, e in zip(labelled, train, strict=True))
        else:
            hits = sum(y == reference_answer(task, e) for y, e in zip(labelled, train, strict=True))
        row["teacher_label_acc"] = {"acc": hits / len(train), "n": len(train),
                                    "ci95": wilson_interval(hits, len(train))}  # fmt: skip
        row["teacher_labels"] = ceiling("teacher_labels", labelled)

    def votes() -> list[dict]:
        """Every train input's voted answer and agreement (cached: one vote serves every row)."""
        return cached(
            base / f"votes-{args.votes}-{len(train)}.json",
            lambda: {"labels": voted_labels(task, teacher, train, args.votes)},
        )["labels"]

    if "voted_labels" in wanted:
        if task.mode == "generate":
            suffix = "" if args.vote_agreement == 0.5 else f"-agree{args.vote_agreement}"
            key = f"voted{args.votes}_labels{suffix}"
            sure = votes()
        else:
            key = f"confident{args.choice_confidence}_labels"
            sure = cached(
                base / f"confidence-{len(train)}.json",
                lambda: {"labels": confident_labels(task, teacher, train)},
            )["labels"]
        row["voted_label_acc"] = vote_accuracy(sure, train, args, task)
        threshold = row["voted_label_acc"]["min_agreement"]
        row["voted_labels"] = ceiling(
            key, [v["text"] if v["agreement"] >= threshold else None for v in sure]
        )
    if "weighted_labels" in wanted and task.mode == "generate":
        voted = votes()
        row["weighted_labels"] = ceiling(
            f"weighted{args.votes}_labels",
            [v["text"] for v in voted],
            weights=[v["agreement"] for v in voted],
        )
    if "soft_labels" in wanted and task.mode != "generate":
        spread = cached(
            base / f"distribution-{len(train)}.json",
            lambda: {"probabilities": option_spread(task, teacher, train)},
        )["probabilities"]
        inputs, labels = soft_draws(task, train, spread, args.soft_draws, args.seed)
        # the draws' seed in the key: a soup's member with seed s must not reuse the student
        # of a plain --seed s run, whose labels were drawn with another seed
        key = f"soft{args.soft_draws}d{args.seed}_labels"
        row["soft_labels"] = ceiling(key, labels, inputs)
    for key in ROWS:
        if row[key] is not None:
            row[key].pop("predictions", None)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    from migration_quality import bases
    from run_record import run_record

    from vllm_lora_ext.files import write_atomic
    from vllm_lora_ext.settings import Settings

    found = bases(args, work)
    if found is None:
        return 2
    smol_dir, gemma_dir, _, target = found
    models = {"smol_dir": smol_dir, "gemma_dir": gemma_dir}
    settings = Settings()  # after bases(): a quick run's scratch cache
    root = args.cache or settings.cache_dir / "migration_ceilings"
    result: dict[str, Any] = {
        "run": {**run_record(args), "machine": "x86_64, 2-core CPU, no GPU"},
        "target_base": target,
        "tasks": [],
    }
    if args.quick:
        result |= {"source_base": models["smol_dir"].name, "quick": True, "note": quick.NOTE}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.tasks.split(","):
        result["tasks"].append(run_task(args, name, models, root))
        path = args.out / f"{args.name}.json"
        write_atomic(path, json.dumps(result, indent=1).encode())
        plot(result, args.out / f"{args.name}.png")
    print(table(result))
    return 0


def held_out_n(row: dict) -> int | str:
    """Held-out examples scored for a task (the same for every row it ran)."""
    return next((row[k]["n"] for k in ROWS if row.get(k)), "—")


def table(result: dict) -> str:
    head = "| task | n | " + " | ".join(LABELS[k] for k in ROWS)
    head += " | teacher on train | voted labels on train (kept) |"
    lines = [head, "|---" * (len(ROWS) + 4) + "|"]

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        lo, hi = r["ci95"]
        return f"{r['acc']:.2f} [{lo:.2f}, {hi:.2f}]"

    for t in result["tasks"]:
        cells = " | ".join(cell(t.get(k)) for k in ROWS)
        voted = t.get("voted_label_acc")
        kept = f" ({voted['coverage']:.0%})" if voted else ""
        lines.append(f"| {t['task']} | {held_out_n(t)} | {cells} | "
                     f"{cell(t['teacher_label_acc'])} | {cell(voted)}{kept} |")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    width = 0.8 / len(ROWS)
    fig, ax = plt.subplots(figsize=(2.4 * len(tasks) + 3, 4))
    for i, key in enumerate(ROWS):
        have = [(t, r[key]) for t, r in enumerate(tasks) if r.get(key)]
        xs = [t + (i - (len(ROWS) - 1) / 2) * width for t, _ in have]
        acc = [v["acc"] for _, v in have]
        err = [[a - v["ci95"][0] for a, (_, v) in zip(acc, have, strict=True)],
               [v["ci95"][1] - a for a, (_, v) in zip(acc, have, strict=True)]]  # fmt: skip
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=LABELS[key], color=f"C{i}")
    ax.set_xticks(range(len(tasks)), [f"{r['task']}\n(n={held_out_n(r)})" for r in tasks])
    ax.set_ylabel("held-out accuracy (95% interval)")
    ax.set_ylim(0, 1)
    ax.set_title(f"ceilings on {result['target_base'].split(' ')[0]}, commit "
                 f"{str(result['run']['commit'])[:10]}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
