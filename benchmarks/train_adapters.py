"""Train one PEFT LoRA per task on a real model (float32, CPU), with a card each, and screen them.

    python benchmarks/train_adapters.py                              # the committed SmolLM2 set
    python benchmarks/train_adapters.py --tasks snarks --epochs 6    # one more
    python benchmarks/train_adapters.py --quick     # smoke run: tiny Llama, synthetic tasks

A source adapter stands for a user's own adapter, trained on all of its data: the budget is
``--epochs`` over the task's train split (linear warmup, cosine decay), not a fixed step count.
Each task's base and adapter are scored in process on the same held-out examples (paired), and
``--screen`` collects them in one file (``benchmarks/results/adapter_screen.json``): the tasks
kept (>= ``--keep-margin`` above the base) and those dropped, with their intervals; rows of
tasks an earlier run screened stay, each with its commit, so a screen can grow by task.

Deterministic given the seed: the task split (seeded), the batch order (seeded) and the LoRA
init (seeded). Loss only on the answer tokens (+ the end-of-turn token, so the model learns to
stop). Writes ``adapters/<model>/<task>/`` (PEFT files + card.json, which records the run)
atomically; ``--quick`` writes to ``<tmp>/train_adapters_quick/<task>/`` unless ``--out`` says
otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import quick
import torch
from run_record import run_record

from vllm_lora_ext.evaluation.backends import TransformersBackend
from vllm_lora_ext.evaluation.evaluate import evaluate
from vllm_lora_ext.evaluation.prompts import answer_ids, build_prompt
from vllm_lora_ext.evaluation.scoring import paired_difference_interval
from vllm_lora_ext.evaluation.tasks import Task, load_task, reference_answer
from vllm_lora_ext.files import write_atomic
from vllm_lora_ext.training import (
    LoraHyperparameters,
    answer_end_ids,
    attach_lora,
    save_adapter_atomically,
    train_lora,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = (
    "arithmetic,disambiguation_qa,date_understanding,object_counting,geometric_shapes,"
    "boolean_expressions,reasoning_about_colored_objects"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--epochs", type=float, default=5.0, help="passes over the train split")
    p.add_argument("--steps", type=int, help="a fixed step count instead of --epochs")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps warming up")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=384, help="longer rows are left out")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, help="score only the first N held-out examples")
    p.add_argument("--out", type=Path, help="default: adapters/<model name>")
    p.add_argument("--screen", type=Path, help="write the screen of every task trained here")
    p.add_argument("--keep-margin", type=float, default=0.10, help="points above the base")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny Llama (unless --model), synthetic tasks, 3 steps",
    )
    args = p.parse_args(argv)
    if args.quick:
        if args.tasks == DEFAULT_TASKS:
            args.tasks = "arithmetic,sports_understanding"  # one generated, one multiple choice
        args.steps, args.batch, args.eval_limit = min(args.steps or 3, 3), min(args.batch, 4), 6
        args.out = args.out or quick.out_dir("train_adapters")
    return args


def training_rows(task: Task, tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, answer start) per train example that fits in ``max_len``."""
    end = answer_end_ids(tokenizer)
    rows = []
    for e in task.train:
        prompt = build_prompt(tokenizer, task, e)
        answer = list(answer_ids(tokenizer, prompt, reference_answer(task, e))) + end
        ids = [*prompt.ids, *answer]
        if len(ids) <= max_len:
            rows.append((ids, len(prompt.ids)))
    return rows


def train_one(args: argparse.Namespace, model_dir: Path, name: str, out_root: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = load_task(name, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_acc = evaluate(task, TransformersBackend(base, tokenizer), limit=args.eval_limit)

    rows = training_rows(task, tokenizer, args.max_len)
    steps = args.steps or max(1, math.ceil(args.epochs * len(rows) / args.batch))
    hp = LoraHyperparameters(
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(args.targets.split(",")),
        steps=steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        warmup=args.warmup,
        decay=True,
    )
    model = attach_lora(base, hp)
    data_hash = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_lora(model, rows, hp, pad, desc=name)
    train_seconds = time.perf_counter() - start
    adapter_acc = evaluate(task, TransformersBackend(model, tokenizer), limit=args.eval_limit)

    diff, diff_ci = paired_difference_interval(adapter_acc.hits, base_acc.hits)
    card = {
        **task.provenance(),
        "base": model_dir.name,
        "mode": task.mode,
        "epochs": round(steps * args.batch / max(len(rows), 1), 2),
        "steps": steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "schedule": "linear warmup, cosine decay to 0.1 lr",
        "rank": args.rank,
        "lora_alpha": args.alpha,
        "targets": args.targets.split(","),
        "seed": args.seed,
        "train_rows": len(rows),
        "train_rows_left_out": len(task.train) - len(rows),
        "data_sha256": data_hash,
        "train_seconds": round(train_seconds, 1),
        "heldout_n": adapter_acc.n,
        "base_heldout_acc": base_acc.accuracy,
        "base_heldout_ci95": base_acc.ci95,
        "adapter_heldout_acc": adapter_acc.accuracy,
        "adapter_heldout_ci95": adapter_acc.ci95,
        "adapter_minus_base": diff,
        "adapter_minus_base_ci95": diff_ci,
        "evaluated_with": "transformers + PEFT, float32",
        "quick": args.quick,
        "run": run_record(args),
    }
    save_adapter_atomically(model, out_root / name, {"card.json": json.dumps(card, indent=2)})
    print(f"{name}: base {base_acc.accuracy:.3f} -> adapter {adapter_acc.accuracy:.3f} "
          f"(n={adapter_acc.n}, {steps} steps, {train_seconds:.0f} s)")  # fmt: skip
    return card


def write_screen(path: Path, args: argparse.Namespace, cards: list[dict]) -> None:
    """The screen: every task trained, kept or dropped by its paired gain over the base."""
    keys = ("task", "task_source", "mode", "heldout_n", "base_heldout_acc", "base_heldout_ci95",
            "adapter_heldout_acc", "adapter_heldout_ci95", "adapter_minus_base",
            "adapter_minus_base_ci95", "epochs", "steps", "train_rows",
            "train_seconds")  # fmt: skip
    rows = [
        {k: card[k] for k in keys}
        | {"kept": card["adapter_minus_base"] >= args.keep_margin, "commit": card["run"]["commit"]}
        for card in cards
    ]
    # A screen grows: tasks screened by earlier runs (and not again here) keep their rows, each
    # with the commit that made it.
    trained = {row["task"] for row in rows}
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("quick") == args.quick:
            rows = [r for r in earlier["rows"] if r["task"] not in trained] + rows
    record = {"experiment": "adapter_screen", "keep_margin": args.keep_margin,
              "evaluated_with": "transformers + PEFT, float32, in process", "rows": rows,
              "quick": args.quick, "run": run_record(args)}  # fmt: skip
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1 if args.quick else 2)  # a tiny model: one thread is faster
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            quick.isolate(Path(tmp))
        if args.model is not None:
            model_dir = Path(args.model).resolve()
        elif args.quick:
            model_dir = quick.tiny_llama(Path(tmp))
        else:
            from vllm_lora_ext.base_models import ensure_default_model
            from vllm_lora_ext.settings import Settings

            model_dir = ensure_default_model(Settings().cache_dir)
        out_root = args.out or ROOT / "adapters" / model_dir.name
        out_root.mkdir(parents=True, exist_ok=True)
        cards = []
        for name in args.tasks.split(","):
            cards.append(train_one(args, model_dir, name, out_root))
            if args.screen is not None:  # after each task: a cut-off run keeps what it screened
                write_screen(args.screen, args, cards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
