"""Capacity against ``--max-loras``: how many adapters one batch may mix, on our CPU LoRA path.

vLLM's scheduler puts requests of at most ``--max-loras`` distinct adapters into one batch; on
our grouped CPU path a slot costs memory only (see docs/operations.md, sizing), so the question
is how far more slots raise the capacity with many adapters. For each value a server of its own
is started (``serving.py --start``) and the saturation rows of ``serving.py`` are taken: the
base alone, then N adapters, same draws; ratios are to the base of the same server.

    python benchmarks/max_loras_curve.py --start DIR               # 8,16,32,64 slots, N=64
    python benchmarks/max_loras_curve.py --quick                   # the tiny Llama, 2 and 4

Writes benchmarks/results/max_loras_curve.json and a PNG beside it; ``--quick`` writes to
``<tmp>/max_loras_curve_quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import quick
import serving
from run_record import run_record

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--start", type=Path, help="the model folder to serve")
    p.add_argument("--max-loras", default="8,16,32,64", help="comma-separated values")
    p.add_argument("--n-adapters", type=int, default=64)
    p.add_argument("--max-cpu-loras", type=int, default=64)
    p.add_argument("--saturation-requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="the tiny test Llama, 2 and 4 slots")
    args = p.parse_args(argv)
    if args.quick:
        args.max_loras, args.n_adapters, args.max_cpu_loras = "2,4", 4, 8
        args.saturation_requests, args.concurrency = 8, 4
        args.out = args.out or quick.out_dir("max_loras_curve") / "max_loras_curve.json"
    elif args.start is None:
        p.error("--start is required (or --quick)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = tempfile.TemporaryDirectory(prefix="bench-max-loras-")
    model = args.start or quick.tiny_llama(Path(scratch.name))
    rows = []
    try:
        for k in [int(v) for v in args.max_loras.split(",")]:
            out = Path(scratch.name) / f"serving-{k}.json"
            serve_args = f"--max-loras {k} --max-cpu-loras {max(args.max_cpu_loras, k)}"
            if args.quick:
                serve_args += " --max-model-len 512 --kv-cache-gib 1"
            serving.main([
                "--start", str(model), "--n-adapters", str(args.n_adapters),
                "--rate-fractions", "", "--serve-args", serve_args, "--out", str(out),
                "--saturation-requests", str(args.saturation_requests),
                "--concurrency", str(args.concurrency),
                *(["--prompt-tokens", "8,16", "--output-tokens", "4,8", "--warmup", "1"]
                  if args.quick else []),
            ])  # fmt: skip
            doc = json.loads(out.read_text())
            bases = [r["throughput_tok_s"] for r in doc["rows"] if r["n_adapters"] == 0]
            many = doc["rows"][1]
            rows.append({
                "max_loras": k, "base_tok_s": sum(bases) / len(bases), "base_runs_tok_s": bases,
                "adapters_tok_s": many["throughput_tok_s"], "ratio_to_base": many["ratio_to_base"],
                "ttft_p50_ms": many["ttft_p50_ms"], "ttft_p99_ms": many["ttft_p99_ms"],
                "loads_in_step": many["loads_in_step"], "loads_ahead": many["loads_ahead"],
            })  # fmt: skip
            print(f"--max-loras {k}: {rows[-1]['ratio_to_base']:.2f}x base", flush=True)
            device, model_name = doc["device"], doc["model"]
    finally:
        scratch.cleanup()
    report = {
        "device": device,
        "model": model_name,
        "n_adapters": args.n_adapters,
        "rows": rows,
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        report["note"] = quick.NOTE
    out = args.out or RESULTS / "max_loras_curve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["max_loras"] for r in report["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["ratio_to_base"] for r in report["rows"]], "o-")
    ax.set_xscale("log", base=2)
    title = f"{report['n_adapters']} adapters, {report['model']}, {report['device']}"
    ax.set(xlabel="--max-loras", ylabel="capacity / base capacity", ylim=(0, 1.1), title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
