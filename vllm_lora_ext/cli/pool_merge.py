"""``vllm-lora-ext pool-merge``: the adaptive / lorahub merge offline, on adapter folders.

The same pipeline as ``POST /v1/merges`` with ``method: adaptive`` (:mod:`merge.pool_merge`),
for a base model folder, a pool of PEFT folders and a JSONL file of ``{"input", "output"}``
target examples. The folded adapter is written with a ``recipe.json`` that carries the
selection, the weights, every control and the verdict (staged beside ``--out``, then renamed).
Exit codes: 0 written, 2 bad input or refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from vllm_lora_ext.adapters.lora_weights import load_lora, save_lora
from vllm_lora_ext.adapters.peft_format import WEIGHTS_FILE
from vllm_lora_ext.adapters.recipe import RECIPE_FILE, RECIPE_FORMAT, RECIPE_VERSION
from vllm_lora_ext.files import sha256_file
from vllm_lora_ext.merge.offline import common_base


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pool-merge",
        help="adaptive / lorahub merge of a pool of adapter folders for a new task (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=["adaptive", "lorahub"], default="adaptive")
    p.add_argument("--model", required=True, type=Path, help="the base model folder")
    p.add_argument("--pool", action="append", required=True, type=Path, help="repeat per adapter")
    p.add_argument("--examples", required=True, type=Path, help='JSONL of {"input", "output"}')
    p.add_argument("--out", required=True, type=Path, help="new adapter folder (not existing)")
    p.add_argument("--k", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, help="adaptive only")
    p.add_argument("--selection", choices=["evaluation", "random", "cosine"])
    p.add_argument("--seed", type=int)
    p.add_argument("--no-controls", dest="controls", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from vllm_lora_ext.merge.pool_merge import PARAMS, pool_merge

    def refuse(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if args.out.exists():
        return refuse(f"{args.out} already exists")
    names = [p.name for p in args.pool]
    if len(set(names)) != len(names):
        return refuse("two pool folders share a name")
    try:
        base = common_base(args.pool)
        examples = [_example(line) for line in args.examples.read_text().splitlines() if line]
        raw = {k: getattr(args, k) for k in ("k", "steps", "lr", "selection", "seed")}
        raw = {k: v for k, v in raw.items() if v is not None} | {"controls": args.controls}
        if args.method == "lorahub":
            raw.pop("lr", None)
        params = PARAMS[args.method].model_validate(raw)
        pool = {p.name: load_lora(p) for p in args.pool}
        result = pool_merge(args.model, pool, examples, args.method, params)
    except (OSError, ValueError, ValidationError) as e:
        return refuse(str(e))
    sources = [
        {
            "path": str(p.resolve()),
            "weight": result.weights[p.name],
            "sha256": sha256_file(p / WEIGHTS_FILE),
        }
        for p in args.pool
        if p.name in result.weights
    ]
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "method": args.method,
        "params": params.model_dump() | {"examples": len(examples)},
        "rank": result.merged.rank,
        "base_model_name_or_path": base,
        "sources": sources,
        **result.report(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.staging-", dir=args.out.parent))
    try:
        save_lora(result.merged, staging, base)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        if args.out.exists():
            return refuse(f"{args.out} already exists")
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(result.verdict)
    print(args.out)
    return 0


def _example(line: str) -> tuple[str, str]:
    row = json.loads(line)
    if not isinstance(row, dict) or not row.get("input") or not row.get("output"):
        raise ValueError(f'each examples line needs "input" and "output": {line[:80]}')
    return str(row["input"]), str(row["output"])
