"""Train one PEFT LoRA per BIG-bench task on a real model (float32, CPU), with a card each.

    python benchmarks/train_adapters.py                              # the committed SmolLM2 set
    python benchmarks/train_adapters.py --tasks snarks --steps 40    # one more

Deterministic given the seed: the task split (seeded), the batch order (seeded) and the LoRA
init (seeded). Loss only on the answer tokens (+ the end-of-turn token, so the model learns to
stop). Writes ``adapters/<model>/<task>/`` (PEFT files + card.json) atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_lora_ext.evaluation.backends import TransformersBackend
from vllm_lora_ext.evaluation.evaluate import evaluate
from vllm_lora_ext.evaluation.prompts import answer_ids, build_prompt, stop_token_ids
from vllm_lora_ext.evaluation.tasks import Example, Task, load_task

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = "arithmetic,object_counting,disambiguation_qa"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=200, help="held-out examples scored")
    p.add_argument("--out", type=Path, help="default: adapters/<model name>")
    return p.parse_args(argv)


def training_rows(task: Task, tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, answer start) per train example that fits in ``max_len``."""
    stop = stop_token_ids(tokenizer)
    end = (
        [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if "<|im_end|>" in tokenizer.get_vocab()
        else list(stop[:1])
    )
    rows = []
    for e in task.train:
        prompt = build_prompt(tokenizer, task, e)
        answer = list(answer_ids(tokenizer, prompt, _answer(task, e))) + end
        ids = [*prompt.ids, *answer]
        if len(ids) <= max_len:
            rows.append((ids, len(prompt.ids)))
    return rows


def _answer(task: Task, e: Example) -> str:
    return e.options[e.correct[0]] if task.mode == "multiple_choice" else e.targets[0]


def batches(rows, batch: int, steps: int, seed: int, pad: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        picked = [rows[i] for i in order[:batch]]
        del order[:batch]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.full((len(picked), width), pad, dtype=torch.long)
        labels = torch.full((len(picked), width), -100, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for r, (seq, start) in enumerate(picked):
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, start : len(seq)] = torch.tensor(seq[start:])
            mask[r, : len(seq)] = 1
        yield ids, mask, labels


def train_one(args: argparse.Namespace, model_dir: Path, name: str, out_root: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = load_task(name, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_acc = evaluate(task, TransformersBackend(base, tokenizer), limit=args.eval_limit)

    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    rows = training_rows(task, tokenizer, args.max_len)
    data_hash = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(batches(rows, args.batch, args.steps, args.seed, pad), total=args.steps, desc=name)
    for ids, mask, labels in bar:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    adapter_acc = evaluate(task, TransformersBackend(model, tokenizer), limit=args.eval_limit)

    target = out_root / name
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_root))
    try:
        model.save_pretrained(staging)
        card = {
            "task": name,
            "base": model_dir.name,
            "mode": task.mode,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "rank": args.rank,
            "lora_alpha": args.alpha,
            "targets": args.targets.split(","),
            "seed": args.seed,
            "split_sizes": task.sizes,
            "task_sources_sha256": task.sources,
            "train_rows": len(rows),
            "data_sha256": data_hash,
            "train_seconds": round(train_seconds, 1),
            "heldout_n": adapter_acc.n,
            "base_heldout_acc": base_acc.accuracy,
            "adapter_heldout_acc": adapter_acc.accuracy,
            "evaluated_with": "transformers + PEFT, float32",
        }
        (staging / "card.json").write_text(json.dumps(card, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{name}: base {base_acc.accuracy:.3f} -> adapter {adapter_acc.accuracy:.3f} "
          f"(n={adapter_acc.n}, {train_seconds:.0f} s)")  # fmt: skip
    return card


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    if args.model is None:
        from vllm_lora_ext.base_models import ensure_default_model
        from vllm_lora_ext.settings import Settings

        model_dir = ensure_default_model(Settings().cache_dir)
    else:
        model_dir = Path(args.model).resolve()
    out_root = args.out or ROOT / "adapters" / model_dir.name
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.tasks.split(","):
        train_one(args, model_dir, name, out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
