"""CPU multi-LoRA serving throughput: our grouped wrapper vs vLLM's, side by side in one run.

Each provider runs in its own process (one ``vllm.LLM`` each, same settings):
  base   LoRA disabled: the ceiling
  ours   LoRA enabled, VLLM_LORA_EXT_CPU_PUNICA=ours (vllm_lora_ext.cpu_lora)
  vllm   LoRA enabled, VLLM_LORA_EXT_CPU_PUNICA=vllm (vLLM's PunicaWrapperCPU)
and measures output tokens/s for: no adapter requested, all requests on 1 adapter, spread over
8 adapters, spread over 32 adapters (more than --max-loras). Medians over --repeats.

    python benchmarks/cpu_serving.py            # SmolLM2-135M-Instruct, the issue's workload
    python benchmarks/cpu_serving.py --quick    # a smoke run on the tiny test Llama

Writes benchmarks/results/cpu_serving.json and .png. ``--quick`` (8 requests x 16 tokens,
1 repeat, the tiny test Llama of ``benchmarks/quick.py`` unless ``--model``) writes to
``<tmp>/cpu_serving_quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import quick
from run_record import run_record

RESULTS = Path(__file__).parent / "results"
MODES = {"base": 0, "1 adapter": 1, "8 adapters": 8, "32 adapters": 32}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-cpu-loras", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--providers", default="base,ours,vllm")
    p.add_argument(
        "--quick",
        action="store_true",
        help="8 requests x 16 tokens, 1 repeat, the tiny test Llama unless --model",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "cpu_serving.json")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from --out, no run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--adapters-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.output_tokens, args.repeats = 8, 16, 1
        if args.out == p.get_default("out") and not args.worker:  # never the committed run
            args.out = quick.out_dir("cpu_serving") / "cpu_serving.json"
    return args


def make_adapters(model: Path, out: Path, n: int, rank: int) -> list[Path]:
    """Random rank-r adapters on q/k/v/o with the model's shapes (speed ignores the values)."""
    import torch
    from safetensors.torch import save_file

    from vllm_lora_ext.adapters.base_model import BaseModelInfo
    from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, tensor_key

    base = BaseModelInfo.from_hf_config(model.name, json.loads((model / "config.json").read_text()))
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        d = out / f"bench-{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(base.num_layers):
            for module in TARGETS:
                fan_in, fan_out = base.module_shapes[module]
                tensors[tensor_key(layer, module, "A")] = (
                    torch.randn(rank, fan_in, generator=g) * 0.01
                )
                tensors[tensor_key(layer, module, "B")] = (
                    torch.randn(fan_out, rank, generator=g) * 0.01
                )
        save_file(tensors, str(d / WEIGHTS_FILE))
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(TARGETS),
        }
        (d / CONFIG_FILE).write_text(json.dumps(config))
        dirs.append(d)
    return dirs


def run_worker(args: argparse.Namespace) -> dict:
    """One provider: build the engine once, time every mode ``repeats`` times."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = args.worker != "base"
    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=True,
        enable_lora=lora,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=max(8, args.rank),
        max_model_len=args.prompt_tokens + args.output_tokens + 16,
        seed=0,
    )
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]}
        for _ in range(args.requests)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    adapters = sorted(args.adapters_dir.iterdir())
    requests = {
        mode: [
            LoRARequest(f"a{i % n}", i % n + 1, str(adapters[i % n])) if n else None
            for i in range(args.requests)
        ]
        for mode, n in MODES.items()
    }
    modes = list(MODES) if lora else ["base"]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved, so drift hits every mode alike
            kwargs = {"lora_request": requests[mode]} if lora else {}
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False, **kwargs)
            elapsed = time.perf_counter() - start
            produced = sum(len(o.outputs[0].token_ids) for o in outs)
            assert produced == args.requests * args.output_tokens
            times[mode].append(produced / elapsed)
            print(f"[{args.worker}] {mode}: {produced / elapsed:.1f} tok/s", file=sys.stderr)
    return {m: {"median": statistics.median(v), "all": v} for m, v in times.items()}


def spawn(provider: str, args: argparse.Namespace, adapters_dir: Path) -> dict:
    env = {
        **os.environ,
        "VLLM_PLUGINS": "lora_ext",
        "VLLM_LORA_EXT_CPU_PUNICA": "vllm" if provider == "vllm" else "ours",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    }
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [
            sys.executable, __file__, "--worker", provider, "--model", str(args.model),
            "--adapters-dir", str(adapters_dir), "--requests", str(args.requests),
            "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens),
            "--repeats", str(args.repeats), "--max-loras", str(args.max_loras),
            "--max-cpu-loras", str(args.max_cpu_loras), "--rank", str(args.rank),
            "--out", result.name,
        ]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(result.name).read_text())


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["ours_tok_s"] or 0 for r in rows], w, label="ours (grouped)")
    ax.bar(
        [x + w / 2 for x in xs],
        [r["vllm_tok_s"] or 0 for r in rows],
        w,
        label="vLLM PunicaWrapperCPU",
    )
    if rows[0]["base_tok_s"]:
        ax.axhline(rows[0]["base_tok_s"], color="k", ls="--", lw=1, label="base, LoRA disabled")
    ax.set_xticks(list(xs), [r["mode"] for r in rows])
    ax.set_ylabel("output tokens/s (median)")
    title = textwrap.fill(f"{report['model']}: {report['workload']} ({report['machine']})", 90)
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.out.write_text(json.dumps(run_worker(args)))
        return 0
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    providers = args.providers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None and args.quick:
            args.model = quick.tiny_llama(Path(tmp) / "model")
        elif args.model is None:
            from vllm_lora_ext.base_models import ensure_default_model
            from vllm_lora_ext.settings import Settings

            args.model = ensure_default_model(Settings().cache_dir)
        args.model = Path(args.model).resolve()
        adapters = Path(tmp) / "adapters"
        make_adapters(args.model, adapters, max(MODES.values()), args.rank)
        measured = {p: spawn(p, args, adapters) for p in providers}
    base = measured.get("base", {}).get("base", {}).get("median")
    rows = []
    for mode, n in MODES.items():
        ours = measured.get("ours", {}).get(mode, {})
        theirs = measured.get("vllm", {}).get(mode, {})
        rows.append(
            {
                "mode": mode,
                "n_adapters": n,
                "ours_tok_s": ours.get("median"),
                "vllm_tok_s": theirs.get("median"),
                "base_tok_s": base,
                "ours_over_base": ours["median"] / base if base and ours else None,
                "vllm_over_base": theirs["median"] / base if base and theirs else None,
                "ours_all": ours.get("all"),
                "vllm_all": theirs.get("all"),
            }
        )
    report = {
        "model": args.model.name,
        "workload": (
            f"{args.requests} requests x {args.prompt_tokens} prompt + {args.output_tokens} "
            f"greedy output tokens, rank {args.rank} on {'/'.join(TARGETS)}, "
            f"max_loras={args.max_loras}, max_cpu_loras={args.max_cpu_loras}, float32, "
            f"enforce_eager, median of {args.repeats}"
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "base_is": "LoRA disabled (enable_lora=False), same engine settings",
        "rows": rows,
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        report["note"] = quick.NOTE
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.rename(args.out)
    plot(report, args.out.with_suffix(".png"))
    for r in rows:
        print(
            f"{r['mode']:>12}: ours {r['ours_tok_s'] or 0:7.1f}  vllm {r['vllm_tok_s'] or 0:7.1f}"
            f"  base {base or 0:7.1f} tok/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
