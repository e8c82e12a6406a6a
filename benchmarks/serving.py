"""Open-loop serving benchmark: many adapters against the base model alone, on one server.

Requests arrive as a Poisson process at a fixed rate (open loop: an arrival never waits for an
earlier answer), each with a prompt and output length drawn uniformly from a range, each naming
an adapter drawn from a Zipf or uniform popularity over N registered adapters; the same
schedule with the base model alone runs in the same run, on the same server, as the reference.
Streaming responses give time to first token (TTFT) and time per output token after it (TPOT).
Below saturation the throughput equals the offered load whatever N is; the ratio to the base
tells something only at a rate the server cannot keep up with, so include one.

    # against a running server (the adapters are created and registered by the benchmark)
    python benchmarks/serving.py --url http://127.0.0.1:8000 --model-dir DIR
    # a self-contained dry run on a tiny model (starts its own server)
    python benchmarks/serving.py --start DIR --n-adapters 1,8 --rates 4 --duration 10
    # a smoke run: the tiny test Llama (its own server unless --url), seconds per row
    python benchmarks/serving.py --quick

Writes benchmarks/results/serving-<device>.json ({"device", "model", "rows": [...]}) and a PNG
beside it: throughput against N (one line per rate) and the TTFT distribution per N; ``--quick``
writes to ``<tmp>/serving_quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import quick
from run_record import run_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running vllm-lora-ext server")
    where.add_argument("--start", type=Path, help="start a server on this model folder")
    p.add_argument("--model-dir", type=Path, help="the served model's folder (adapter shapes)")
    p.add_argument("--n-adapters", default="1,8,64,256", help="comma-separated N")
    p.add_argument("--rates", default="2,8", help="arrival rates, requests/s, comma-separated")
    p.add_argument("--popularity", choices=["zipf", "uniform"], default="zipf")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per row")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of discarded load first")
    p.add_argument("--prompt-tokens", default="32,128", help="uniform range, min,max")
    p.add_argument("--output-tokens", default="16,64", help="uniform range, min,max")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--serve-args", default="", help="with --start: extra `serve` arguments")
    p.add_argument("--device", help="device label for the results (default: this machine's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default results/serving-<device>.json)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: N 1,4 at 4 req/s for 3 s, short requests; without --url or --start, "
        "starts a server on the tiny test Llama",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n_adapters, args.rates, args.duration, args.warmup = "1,4", "4", 3.0, 1.0
        args.prompt_tokens, args.output_tokens = "8,16", "4,8"
        if args.url is None and args.start is None:
            args.serve_args = args.serve_args or "--max-model-len 512 --kv-cache-gib 1"
    elif args.url is None and args.start is None:
        p.error("one of the arguments --url --start is required (or --quick)")
    if args.start is not None:
        args.model_dir = args.model_dir or args.start
    if args.model_dir is None and not (args.quick and args.url is None):
        p.error("--model-dir is needed with --url (adapters are made with the model's shapes)")
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


# -- adapters ----------------------------------------------------------------------------------


def register_adapters(client: httpx.Client, model_dir: Path, n: int, args) -> list[str]:
    """``bench-000 ..`` random rank-r adapters (speed ignores the values), uploaded once."""
    import torch
    from safetensors.torch import save

    from vllm_lora_ext.adapters.base_model import BaseModelInfo
    from vllm_lora_ext.adapters.peft_format import tensor_key

    have = {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}
    base = BaseModelInfo.from_hf_config(
        model_dir.name, json.loads((model_dir / "config.json").read_text())
    )
    targets = args.targets.split(",")
    names = [f"bench-{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        if name in have:
            continue
        g = torch.Generator().manual_seed(args.seed * 100_003 + i)
        tensors = {}
        for layer in range(base.num_layers):
            for module in targets:
                fan_in, fan_out = base.module_shapes[module]
                tensors[tensor_key(layer, module, "A")] = torch.randn(
                    args.rank, fan_in, generator=g
                )
                tensors[tensor_key(layer, module, "B")] = (
                    torch.randn(fan_out, args.rank, generator=g) * 1e-3
                )
        config = {
            "peft_type": "LORA",
            "r": args.rank,
            "lora_alpha": 2 * args.rank,
            "target_modules": targets,
            "base_model_name_or_path": base.name,
        }
        files = [
            ("files", ("adapter_config.json", json.dumps(config).encode())),
            ("files", ("adapter_model.safetensors", save(tensors))),
        ]
        r = client.post("/v1/adapters", data={"name": name}, files=files)
        if r.status_code != 201:
            raise SystemExit(f"registering {name} failed ({r.status_code}): {r.text}")
    return names


# -- load ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ttft: float | None
    tpot: float | None
    tokens: int
    done_at: float
    error: str | None = None


def popularity(n: int, kind: str, s: float) -> list[float]:
    weights = [1.0 / (k + 1) ** s for k in range(n)] if kind == "zipf" else [1.0] * n
    total = sum(weights)
    return [w / total for w in weights]


def schedule(
    models: list[str], weights: list[float], rate: float, args, duration: float | None = None
) -> list[tuple]:
    """(arrival s, model, prompt token ids, max_tokens); the same seed gives the same lengths."""
    rng = random.Random(args.seed)
    pmin, pmax = _ints(args.prompt_tokens)
    omin, omax = _ints(args.output_tokens)
    out, t = [], rng.expovariate(rate)
    while t < (args.duration if duration is None else duration):
        prompt = [rng.randrange(10, 200) for _ in range(rng.randint(pmin, pmax))]
        model = rng.choices(models, weights)[0]
        out.append((t, model, prompt, rng.randint(omin, omax)))
        t += rng.expovariate(rate)
    return out


async def one_request(client: httpx.AsyncClient, model: str, prompt, max_tokens: int) -> Outcome:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Outcome(None, None, 0, time.perf_counter(), f"{r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = first if first is not None else now
                    last = now
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Outcome(None, None, 0, time.perf_counter(), type(e).__name__)
    ttft = None if first is None else first - start
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Outcome(ttft, tpot, tokens, time.perf_counter())


def headers() -> dict[str, str]:
    """The server's key from ``VLLM_API_KEY``, as the CLI presents it (none without one)."""
    import os

    from vllm_lora_ext.auth import bearer

    return bearer(os.environ.get("VLLM_API_KEY"))


async def run_load(url: str, plan: list[tuple]) -> tuple[list[Outcome], float]:
    """Fire every request at its arrival time, without waiting for earlier ones."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=limits, headers=headers()
    ) as client:
        t0 = time.perf_counter()

        async def fire(arrival, model, prompt, max_tokens):
            await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            return await one_request(client, model, prompt, max_tokens)

        outcomes = await asyncio.gather(*(fire(*job) for job in plan))
    return list(outcomes), t0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarise(outcomes: list[Outcome], t0: float) -> dict:
    ok = [o for o in outcomes if o.error is None]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    tpot = [o.tpot for o in ok if o.tpot is not None]
    span = max((o.done_at for o in ok), default=t0) - t0
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "throughput_tok_s": sum(o.tokens for o in ok) / span if span > 0 else 0.0,
        **{f"ttft_p{q}_ms": _pct(ttft, q / 100) for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": _pct(tpot, q / 100) for q in (50, 90, 99)},
        "ttft_ms": sorted(1000 * v for v in ttft),
    }


# -- report --------------------------------------------------------------------------------------


def device_label() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import os

    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["n_adapters"] > 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for rate in sorted({r["rate"] for r in rows}):
        mine = sorted((r for r in rows if r["rate"] == rate), key=lambda r: r["n_adapters"])
        xs, ys = [r["n_adapters"] for r in mine], [r["throughput_tok_s"] for r in mine]
        left.plot(xs, ys, "o-", label=f"{rate:g} req/s")
        base = next(r for r in report["rows"] if r["n_adapters"] == 0 and r["rate"] == rate)
        left.axhline(base["throughput_tok_s"], ls=":", color=left.lines[-1].get_color())
    left.set_xscale("log", base=2)
    left.set(
        xlabel="adapters (N)", ylabel="output tokens/s", title="throughput (dotted: base only)"
    )
    left.legend()
    top_rate = max(r["rate"] for r in report["rows"])
    for r in sorted(report["rows"], key=lambda r: r["n_adapters"]):
        if r["rate"] == top_rate and r["ttft_ms"]:
            xs = r["ttft_ms"]
            label = "base" if r["n_adapters"] == 0 else f"N={r['n_adapters']}"
            right.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    right.set(
        xlabel="TTFT (ms)", ylabel="fraction of requests", title=f"TTFT CDF at {top_rate:g} req/s"
    )
    right.legend()
    fig.suptitle(f"{report['model']} on {report['device']}, {report['settings']['popularity']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    scratch = None
    if args.quick and args.url is None and args.start is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-serving-quick-")
        args.start = args.model_dir = quick.tiny_llama(Path(scratch.name))
    if args.start is not None:
        from vllm_lora_ext.server_process import start_server

        n_max = max(_ints(args.n_adapters))
        serve_args = ["--model", str(args.start), "--max-cpu-loras", str(max(n_max, 4))]
        work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
        server = start_server(work, args.start.name, [*serve_args, *args.serve_args.split()])
        args.url = server.url
    try:
        with httpx.Client(base_url=args.url, timeout=300, headers=headers()) as client:
            base_name = client.get("/v1/adapters").json()["base"]
            names = register_adapters(client, args.model_dir, max(_ints(args.n_adapters)), args)
        # The first requests after a start pay for lazy initialisation: not in any row.
        warm = [base_name, *names[:8]]
        top = max(_floats(args.rates))
        asyncio.run(run_load(args.url, schedule(warm, [1.0] * len(warm), top, args, args.warmup)))
        rows = []
        for rate in _floats(args.rates):
            base_plan = schedule([base_name], [1.0], rate, args)
            base = summarise(*asyncio.run(run_load(args.url, base_plan)))
            rows.append({"n_adapters": 0, "rate": rate, "ratio_to_base": 1.0, **base})
            print(f"rate {rate:g}: base {base['throughput_tok_s']:.1f} tok/s", flush=True)
            for n in _ints(args.n_adapters):
                weights = popularity(n, args.popularity, args.zipf_s)
                plan = schedule(names[:n], weights, rate, args)
                stats = summarise(*asyncio.run(run_load(args.url, plan)))
                ratio = stats["throughput_tok_s"] / base["throughput_tok_s"]
                rows.append({"n_adapters": n, "rate": rate, "ratio_to_base": ratio, **stats})
                print(
                    f"rate {rate:g}: N={n} {stats['throughput_tok_s']:.1f} tok/s "
                    f"({ratio:.2f}x base), TTFT p50 {stats['ttft_p50_ms']} ms",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
        if scratch is not None:
            scratch.cleanup()
    device = args.device or device_label()
    report = {
        "device": device,
        "model": args.model_dir.name,
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, str | int | float)},
        "rows": rows,
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        report["note"] = quick.NOTE
    name = f"serving-{'cpu' if device.startswith('cpu') else 'gpu'}.json"
    out = args.out or (quick.out_dir("serving") if args.quick else RESULTS) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
