"""Merge quality on real tasks: single adapters vs classic merges vs IterIS fed by live traffic.

    python benchmarks/merge_quality.py                  # the committed SmolLM2 task adapters
    python benchmarks/merge_quality.py --limit 60 --traffic 48 --iterations 3
    python benchmarks/merge_quality.py --quick          # smoke run: tiny Llama, random adapters
    # IterIS's knobs, scored on the tuning split (validation + train after the traffic), never
    # the held-out one: one row per variant beside iteris_3
    python benchmarks/merge_quality.py --only iteris_3 --split tuning --limit 60 \
        --name merge_quality_iteris_tuning --iteris-variants '[{"weights": [1, 2, 2]}]'

One real server (``vllm-lora-ext serve``, the embedded SmolLM2-135M-Instruct). For each task
adapter: capture statistics while its task's *train* prompts are served as chat requests (the
traffic), then merge all adapters through ``POST /v1/merges`` with each method, and score every
merged adapter on every task's *held-out* split through the server (``HttpBackend``).
Also measured: the throughput of the same traffic with capture off and on, the statistics
memory, and each merge's wall time. Writes benchmarks/results/merge_quality.json and .png
(``--name`` another stem).
``--url`` (with ``--model-dir``) uses a running server instead of starting one. ``--quick`` merges
random adapters of the tiny test Llama for two synthetic tasks (``benchmarks/quick.py``) with
tiny counts, and writes to ``<tmp>/merge_quality_quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import quick
from run_record import run_record

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTERS = ROOT / "adapters" / "SmolLM2-135M-Instruct"
DEFAULT_TASKS = "arithmetic,object_counting,disambiguation_qa"
# Two tasks: the svd merge's rank (8 per adapter) then fits a tiny server's --max-lora-rank 16.
QUICK_TASKS = "arithmetic,sports_understanding"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS)
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=100, help="held-out examples scored per task")
    p.add_argument("--traffic", type=int, default=64, help="train prompts served per adapter")
    # 3 x 16: on the BBH suite 5 iterations replaying 32 prompts per adapter kept the same
    # share of the singles' mean (0.470 against 0.477; merge_quality_iteris5x32.json) in 3.5x
    # the merge time (757 s against 218 s).
    p.add_argument("--iterations", type=int, default=3, help="IterIS iterations (the N run)")
    p.add_argument("--replay", type=int, default=16, help="IterIS prompts replayed per adapter")
    p.add_argument(
        "--iteris-variants",
        type=json.loads,
        default=[],
        help="JSON list of extra IterIS rows: params for the iteris_N row plus, optionally,\n"
        '"weights" (one per task, the manual weights), e.g. \'[{"alpha1": 1e-4, "alpha2": 1e-4}]\'',
    )
    p.add_argument(
        "--only",
        help="comma-separated method rows to run (default: all), e.g. iteris_3 (with its\n"
        "variants)",
    )
    p.add_argument(
        "--split",
        choices=("heldout", "tuning"),
        default="heldout",
        help="score on the held-out split, or on the tuning split (validation + the train\n"
        "examples after the traffic), which is where IterIS's knobs are chosen",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="merge_quality", help="the result files' stem")
    p.add_argument("--url", help="a running vllm-lora-ext server (default: start one)")
    p.add_argument("--model-dir", type=Path, help="with --url: the served base model's folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny Llama, random adapters on two synthetic tasks, tiny counts",
    )
    args = p.parse_args(argv)
    if args.url and args.model_dir is None:
        p.error("--url needs --model-dir (the served base model's tokenizer)")
    if args.quick:
        args.tasks = QUICK_TASKS if args.tasks == DEFAULT_TASKS else args.tasks
        args.limit, args.traffic = min(args.limit, 4), min(args.traffic, 8)
        args.iterations, args.replay = min(args.iterations, 2), min(args.replay, 2)
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("merge_quality")
    return args


def quick_adapters(work: Path, model_dir: Path, names: list[str]) -> Path:
    """Random rank-4 adapters of the tiny Llama, one per task, with the cards training writes."""
    root = work / "adapters"
    for seed, task in enumerate(names):
        card = {"task": task, "seed": 0, "note": "random adapter (--quick)"}
        quick.random_adapter(root / task, model_dir, seed, card=card)
    return root


def methods(
    k: int, iterations: int, replay: int, variants: list[dict] | None = None
) -> dict[str, dict]:
    """Each method with the weights and parameters it is usually run with, plus one IterIS row
    per variant (its params over the iteris_N row's; ``weights``: the manual weights)."""
    avg = 1.0 / k
    iteris_n = {"iterations": iterations, "prompts_per_adapter": replay}
    plan = {
        "linear": {"method": "linear", "weight": avg, "params": {}},
        "ties": {"method": "ties", "weight": 1.0, "params": {"density": 0.5}},
        "dare_ties": {"method": "dare_ties", "weight": 1.0, "params": {"density": 0.5, "seed": 0}},
        "cat_svd": {"method": "svd", "weight": avg, "params": {"svd_rank": 8 * k}},
        "iteris_1": {"method": "iteris", "weight": 1.0, "params": {"iterations": 1}},
        f"iteris_{iterations}": {"method": "iteris", "weight": 1.0, "params": iteris_n},
    }
    for variant in variants or []:
        params = {key: v for key, v in variant.items() if key != "weights"}
        label = f"iteris_{iterations}[" + ",".join(f"{k_}={v}" for k_, v in variant.items()) + "]"
        plan[label] = {
            "method": "iteris",
            "weight": variant.get("weights", 1.0),
            "params": iteris_n | params,
        }
    return plan


def served_name(index: int, label: str) -> str:
    """The name the ``index``-th merge row (``label``) is served and scored under."""
    return f"merged-{index}-{label.split('[')[0]}".replace("_", "-")


def weights(weight: float | list[float], k: int) -> list[float]:
    """One weight per adapter: a row's single weight, or its list (manual weights)."""
    if isinstance(weight, list):
        if len(weight) != k:
            raise SystemExit(f"weights {weight}: need one per task ({k})")
        return [float(w) for w in weight]
    return [float(weight)] * k


def serve_traffic(client, model: str, messages: list[list[dict]], max_tokens: int) -> float:
    """Serve ``messages`` as concurrent chat requests (8 in flight); returns tokens per second."""
    from concurrent.futures import ThreadPoolExecutor

    def one(m: list[dict]) -> int:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": m,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "cache_salt": uuid.uuid4().hex,
            },
        )
        r.raise_for_status()
        usage = r.json()["usage"]
        return usage["prompt_tokens"] + usage["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        tokens = sum(pool.map(one, messages))
    return tokens / (time.perf_counter() - start)


def wait(client, job_id: str) -> dict:
    while True:
        job = client.get(f"/v1/merges/{job_id}").json()
        if job["state"] != "running":
            return job
        print(
            f"    {job['phase']} it {job['iteration']}/{job['iterations']} "
            f"{job['adapter'] or ''} {job['prompts_done']}",
            end="\r",
            flush=True,
        )
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out / f"{args.name}.json.tmp"
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.rename(args.out / f"{args.name}.json")
    plot(result, args.out / f"{args.name}.png")
    print(table(result))
    return 0


def run(args: argparse.Namespace, work: Path) -> dict:
    import httpx
    from transformers import AutoTokenizer

    from vllm_lora_ext.auth import bearer
    from vllm_lora_ext.base_models import DEFAULT_MODEL_NAME, ensure_default_model
    from vllm_lora_ext.evaluation.backends import HttpBackend
    from vllm_lora_ext.evaluation.evaluate import evaluate
    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.tasks import load_task
    from vllm_lora_ext.server_process import start_server
    from vllm_lora_ext.settings import Settings

    names = args.tasks.split(",")
    if args.quick:
        quick.isolate(work)
        model_dir = args.model_dir or quick.tiny_llama(work)
        if args.adapters == DEFAULT_ADAPTERS:
            args.adapters = quick_adapters(work, model_dir, names)
    else:
        model_dir = args.model_dir or ensure_default_model(Settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cards = {t: json.loads((args.adapters / t / "card.json").read_text()) for t in names}
    tasks = {t: load_task(t, seed=cards[t]["seed"]) for t in names}
    adapter = {t: f"task-{t.replace('_', '-')}" for t in names}
    plan = methods(len(names), args.iterations, args.replay, args.iteris_variants)
    if args.only:
        keep = args.only.split(",")  # a row keeps its variants: iteris_3 runs iteris_3[...]
        if unknown := set(keep) - set(plan):
            raise SystemExit(f"--only: no such row {sorted(unknown)}; rows: {', '.join(plan)}")
        plan = {label: spec for label, spec in plan.items() if label.split("[")[0] in keep}
    scored_tasks = tasks
    if args.split == "tuning":  # never the held-out split: knobs are chosen here
        scored_tasks = {
            t: dataclasses.replace(task, heldout=task.validation + task.train[args.traffic :])
            for t, task in tasks.items()
        }
    result: dict = {
        "model": model_dir.name if args.quick else DEFAULT_MODEL_NAME,
        "tasks": names,
        "limit": args.limit,
        "traffic_prompts": args.traffic,
        "split": args.split,
        "machine": "2-core CPU, no GPU",
        "task_provenance": {t: tasks[t].provenance() for t in names},
        "methods": {},
        "plan": plan,
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        result["note"] = quick.NOTE

    server = None
    if args.url is None:
        # Rank 32: IterIS is exact at rank Σ r_i = 24 for three rank-8 adapters.
        serve_args = quick.tiny_serve_args(model_dir) if args.quick else ["--max-lora-rank", "32"]
        server = start_server(work, result["model"], serve_args, allowed_paths=[args.adapters])
    url = args.url or server.url
    headers = bearer(os.environ.get("VLLM_API_KEY"))
    try:
        with httpx.Client(base_url=url, timeout=1800, headers=headers) as c:
            base_name = c.get("/v1/adapters").json()["base"]
            for t in names:
                r = c.post(
                    "/v1/adapters", json={"name": adapter[t], "path": str(args.adapters / t)}
                )
                r.raise_for_status()

            intervals: dict[str, dict[str, list[float]]] = {}
            result["ci95"] = intervals

            def score(model: str) -> dict[str, float]:
                """Accuracy per task (its 95% interval kept in ``result["ci95"][model]``)."""
                backend = HttpBackend(url, model, tokenizer, headers=headers)
                scored = {t: evaluate(scored_tasks[t], backend, limit=args.limit) for t in names}
                intervals[model] = {t: list(r.ci95) for t, r in scored.items()}
                return {t: r.accuracy for t, r in scored.items()}

            print("capturing traffic")
            off, on = [], []
            for t in names:
                msgs = [
                    [{"role": "user", "content": user_message(tasks[t], e)}]
                    for e in tasks[t].train[: args.traffic]
                ]
                half = len(msgs) // 2
                off.append(serve_traffic(c, adapter[t], msgs[:half], 8))
                c.post(f"/v1/stats/{adapter[t]}/start").raise_for_status()
                on.append(serve_traffic(c, adapter[t], msgs[half:], 8))
                c.post(f"/v1/stats/{adapter[t]}/stop").raise_for_status()
                off.append(serve_traffic(c, adapter[t], msgs[:half], 8))
            stats = [
                s for s in c.get("/v1/stats").json()["adapters"]
                if s["adapter"] in adapter.values()
            ]  # fmt: skip
            result["stats_bytes"] = sum(s["bytes"] for s in stats)
            result["stats_tokens"] = {s["adapter"]: s["held_tokens"] for s in stats}
            result["capture_throughput_ratio"] = statistics.median(on) / statistics.median(off)
            result["capture_tokens_per_s"] = {"off": off, "on": on}

            print("scoring single adapters")
            singles = {t: score(adapter[t]) for t in names}
            result["single_adapters"] = singles
            result["single_adapter_mean_acc"] = statistics.mean(singles[t][t] for t in names)
            result["base"] = score(base_name)

            for label, spec in plan.items():
                print(f"merging: {label}")
                body = {
                    "name": served_name(len(result["methods"]), label),
                    "method": spec["method"],
                    "adapters": [
                        {"name": adapter[t], "weight": w}
                        for t, w in zip(names, weights(spec["weight"], len(names)), strict=True)
                    ],
                    "params": spec["params"],
                }
                r = c.post("/v1/merges", json=body)
                r.raise_for_status()
                job = wait(c, r.json()["id"])
                if job["state"] != "succeeded":
                    raise RuntimeError(f"{label}: {job}")
                per_task = score(body["name"])
                result["methods"][label] = {
                    "mean_acc": statistics.mean(per_task.values()),
                    "per_task": per_task,
                    "seconds": job["finished_at"] - job["created_at"],
                    "residual": job["residual"],
                }
                print(f"  {label}: {per_task} ({result['methods'][label]['seconds']:.1f} s)")
    finally:
        if server is not None:
            server.stop()
    return result


def table(result: dict) -> str:
    names = result["tasks"]
    lines = [
        "| method | " + " | ".join(names) + " | mean | merge s |",
        "|---" * (len(names) + 3) + "|",
    ]
    base = result["base"]
    lines.append(
        "| base | "
        + " | ".join(f"{base[t]:.3f}" for t in names)
        + f" | {sum(base.values()) / len(names):.3f} | |"
    )
    singles = result["single_adapters"]
    lines.append(
        "| single adapter (own task) | "
        + " | ".join(f"{singles[t][t]:.3f}" for t in names)
        + f" | {result['single_adapter_mean_acc']:.3f} | |"
    )
    for label, m in result["methods"].items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{m['per_task'][t]:.3f}" for t in names)
            + f" | {m['mean_acc']:.3f} | {m['seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["base", "single", *result["methods"]]
    values = [
        sum(result["base"].values()) / len(result["tasks"]),
        result["single_adapter_mean_acc"],
        *(m["mean_acc"] for m in result["methods"].values()),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, values, color=["grey", "black"] + ["C0"] * len(result["methods"]))
    ax.axhline(
        0.9 * result["single_adapter_mean_acc"],
        ls="--",
        c="k",
        lw=0.8,
        label="90% of single adapters",
    )
    ax.set_ylabel("mean held-out accuracy")
    ax.set_title(f"{result['model']}: {', '.join(result['tasks'])}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
