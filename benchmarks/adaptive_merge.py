"""Adaptive merging from an adapter pool on a held-out task, with the controls beside it.

    python benchmarks/adaptive_merge.py                       # SmolLM2-135M, sports_understanding
    python benchmarks/adaptive_merge.py --method lorahub --k 2 --random 4
    python benchmarks/adaptive_merge.py --quick               # tiny Llama, minutes -> seconds

The pool is every task adapter under ``--adapters`` (the committed SmolLM2-135M-Instruct ones)
except the target task's, plus ``--random`` adapters with the same shapes and norms as pool
adapters and random directions. The target set is ``--examples`` examples of the target task's
*train* split (answers as the task scores them); :func:`merge.pool_merge.pool_merge` selects k,
learns the coefficients (or searches them, ``lorahub``), folds, and computes the controls (base,
uniform average of the selected, the same method over random adapters, a fresh LoRA trained on
the same examples for the same steps). Every row is then scored on the task's *held-out* split
with the in-process transformers backend. Writes ``benchmarks/results/adaptive_merge.json``:
``{"model", "target_task", "rows": [{"method", "acc", "seconds", ...}], ...}``.

``--quick`` (or ``--dry-run``) runs the same pipeline on the tiny test Llama with random "task"
adapters, a synthetic task and a few examples (``benchmarks/quick.py``), to check the script end
to end without the CPU time of a real run; its results go to ``<tmp>/adaptive_merge_quick/``
unless ``--out`` says otherwise, and mean nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import quick
from run_record import run_record

from vllm_lora_ext.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = "sports_understanding"
# The served task adapters, and the pool-only ones (tasks whose adapter gained < 10 points, a
# second seed): with one task held out, 8 task adapters.
DEFAULT_ADAPTERS = [
    ROOT / "adapters" / "SmolLM2-135M-Instruct",
    ROOT / "adapters" / "SmolLM2-135M-Instruct-pool",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="base model folder (default: embedded SmolLM2)")
    p.add_argument(
        "--adapters",
        type=Path,
        nargs="+",
        default=DEFAULT_ADAPTERS,
        help="folders whose task adapters form the pool",
    )
    p.add_argument("--target-task", default=DEFAULT_TARGET)
    p.add_argument("--method", choices=["adaptive", "lorahub"], default="adaptive")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--selection", choices=["evaluation", "random", "cosine"], default="evaluation")
    p.add_argument("--random", type=int, default=4, help="random adapters added to the pool")
    p.add_argument("--examples", type=int, default=100, help="target examples (train split)")
    p.add_argument("--limit", type=int, default=200, help="held-out examples scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quick",
        "--dry-run",
        action="store_true",
        help="smoke run: tiny Llama, random adapters, synthetic task, tiny sizes",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.limit, args.steps = min(args.examples, 12), min(args.limit, 6), 3
        args.k, args.random = min(args.k, 2), min(args.random, 1)
        if args.threads == p.get_default("threads"):
            args.threads = 1  # a tiny model: one thread is ~3x faster on 2 shared cores
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("adaptive_merge")
    return args


def answer_of(task, example) -> str:
    """The answer a target example teaches: the top option, or the first accepted target."""
    if task.mode == "multiple_choice":
        return example.options[example.correct[0]]
    return example.targets[0]


def target_examples(task, n: int) -> list[tuple[str, str]]:
    """(user message, answer) for the first ``n`` train examples, framed as the task is scored."""
    from vllm_lora_ext.evaluation.prompts import user_message

    return [(user_message(task, e), answer_of(task, e)) for e in task.train[:n]]


def load_pool(adapter_dirs: list[Path], exclude: str, n_random: int, seed: int) -> dict:
    """Every task adapter in ``adapter_dirs`` but the target task's (named ``<task>`` or
    ``<task>-<variant>``), plus ``n_random`` random ones."""
    from vllm_lora_ext.adapters.lora_weights import load_lora
    from vllm_lora_ext.merge.adaptive import random_like

    pool = {
        d.name: load_lora(d)
        for root in adapter_dirs
        for d in sorted(root.iterdir())
        if (d / "adapter_config.json").is_file() and d.name.split("-")[0] != exclude
    }
    real = list(pool.values())
    for i in range(n_random):
        pool[f"random-{i}"] = random_like([real[i % len(real)]], seed + 100 + i)[0]
    return pool


def quick_setup(work: Path, seed: int) -> tuple[Path, Path]:
    """The tiny test Llama, three random adapters written as its "task" adapters, and the
    synthetic tasks as the task cache."""
    quick.isolate(work)
    model = quick.tiny_llama(work)
    adapters = work / "adapters"
    for i, name in enumerate(["task-a", "task-b", "task-c"]):
        quick.random_adapter(adapters / name, model, seed + i, rank=4,
                             targets=quick.tiny_model.TARGETS)  # fmt: skip
    return model, adapters


def score(model_dir: Path, adapter, task, limit: int, work: Path, name: str) -> dict:
    """Held-out accuracy of base + ``adapter`` (None: the base alone), in process."""
    from vllm_lora_ext.adapters.lora_weights import save_lora
    from vllm_lora_ext.evaluation.backends import TransformersBackend
    from vllm_lora_ext.evaluation.evaluate import evaluate

    adapter_dir = None
    if adapter is not None:
        adapter_dir = work / f"scored-{name}"
        save_lora(adapter, adapter_dir, base=str(model_dir))
    t = time.monotonic()
    result = evaluate(
        task, TransformersBackend.from_pretrained(model_dir, adapter_dir), limit=limit
    )
    return {"acc": result.accuracy, "ci95": list(result.ci95), "n": result.n,
            "eval_seconds": time.monotonic() - t}  # fmt: skip


def plot(report: dict, path: Path) -> None:
    """Held-out accuracy per row (95% CI), with wall time in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    accs = [r["acc"] for r in rows]
    errors = [[r["acc"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["acc"] for r in rows]]
    ax.bar(range(len(rows)), accs, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['method']}\n{r['seconds']:.0f} s" for r in rows], fontsize=8)
    ax.set_ylabel(f"held-out accuracy (n={rows[0]['n']})")
    ax.set_title(f"{report['method']} merge for {report['target_task']} on {report['model']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    import torch

    from vllm_lora_ext.evaluation.tasks import load_task
    from vllm_lora_ext.merge.pool_merge import PARAMS, pool_merge

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            model_dir, adapters_dir = quick_setup(work, args.seed)
            adapter_dirs = [adapters_dir]
            model_name = "tiny-llama (quick)"
        else:
            from vllm_lora_ext.base_models import ensure_default_model
            from vllm_lora_ext.settings import Settings

            model_dir = args.model or ensure_default_model(Settings().cache_dir)
            adapter_dirs, model_name = args.adapters, Path(model_dir).name
        task = load_task(args.target_task, seed=args.seed)
        pool = load_pool(adapter_dirs, args.target_task, args.random, args.seed)
        params = PARAMS[args.method](
            k=args.k, steps=args.steps, selection=args.selection, seed=args.seed
        )
        print(f"pool: {', '.join(pool)}; target {task.name}: {args.examples} examples", flush=True)
        t = time.monotonic()
        result = pool_merge(
            model_dir,
            pool,
            target_examples(task, args.examples),
            args.method,
            params,
            lambda phase, done, total: print(f"  {phase} {done}/{total}", end="\r", flush=True),
        )
        print(f"\n{result.verdict}  ({time.monotonic() - t:.0f} s)", flush=True)
        rows = []
        for name, control in result.controls.items():
            adapter = result.adapters.get(name)
            scored = score(model_dir, adapter, task, args.limit, work, name)
            rows.append({"method": name, **scored, **control})
            loss, seconds = control["heldout_loss"], control["seconds"]
            print(f"{name:>12}: acc {scored['acc']:.3f}  held-out loss {loss:.3f}  {seconds:.0f} s")
    report = {
        "model": model_name,
        "target_task": task.name,
        "method": args.method,
        "pool": list(pool),
        "selected": result.selected,
        "weights": result.weights,
        "params": params.model_dump(),
        "examples": result.examples,
        "heldout_scored": rows[0]["n"] if rows else 0,  # --limit caps it; the split may be smaller
        "rows": rows,
        "beat_fresh_lora": result.beat_fresh_lora,
        "verdict": result.verdict,
        "note": "seconds: merge = selection + learning + scoring on the target split; "
        "controls: their own training + scoring; acc on the task's held-out split",
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        report["note"] = f"{quick.NOTE}; {report['note']}"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "adaptive_merge.json"
    write_atomic(out, json.dumps(report, indent=2).encode())
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and its plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
