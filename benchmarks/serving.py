"""Serving benchmark: many adapters against the base model alone, on one server, in one run.

Each request has a prompt and output length drawn uniformly from a range and names an adapter
drawn from a Zipf or uniform popularity over N registered adapters; the same draws with the base
model alone are the reference. Two kinds of rows, each for N = 0 (base), then every N:

* **saturation** (closed loop): ``--concurrency`` requests always in flight until
  ``--saturation-requests`` are answered; output tokens/s is the server's capacity, and its ratio
  to the base's is the cost of the adapters.
* **open loop** at fractions of the base's capacity (``--rate-fractions``, found by the first
  row; or absolute ``--rates``): Poisson arrivals that never wait for earlier answers. Below
  saturation the throughput is the offered load whatever N is; these rows are for latency:
  time to first token (TTFT) and per output token after it (TPOT), and TTFT per popularity
  decile of the adapters (starvation of the unpopular ones shows there).

Each row also records the worker's adapter loads from the server's ``/metrics``: read ahead in
the background, or in an engine step (a stall of the whole batch).

    # against a running server (the adapters are created and registered by the benchmark)
    python benchmarks/serving.py --url http://127.0.0.1:8000 --model-dir DIR
    # starting its own server on a model folder, with extra `serve` arguments
    python benchmarks/serving.py --start DIR --serve-args "--max-loras 32"
    # a smoke run: the tiny test Llama (its own server unless --url), seconds per row
    python benchmarks/serving.py --quick

Writes benchmarks/results/serving-<device>.json ({"device", "model", "rows": [...]}) and a PNG
beside it: capacity against N and the TTFT distribution per N; ``--quick`` writes to
``<tmp>/serving_quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
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
    p.add_argument(
        "--rate-fractions", default="0.25,0.5,0.75",
        help="open-loop arrival rates as fractions of the base's measured capacity",
    )  # fmt: skip
    p.add_argument("--rates", default="", help="absolute arrival rates, req/s (replace fractions)")
    p.add_argument("--concurrency", type=int, default=32, help="saturation rows: in flight")
    p.add_argument("--saturation-requests", type=int, default=128, help="saturation rows: answered")
    p.add_argument("--popularity", choices=["zipf", "uniform"], default="zipf")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--duration", type=float, default=60.0, help="open loop: seconds of arrivals")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of discarded load first")
    p.add_argument("--prompt-tokens", default="32,128", help="uniform range, min,max")
    p.add_argument("--output-tokens", default="16,64", help="uniform range, min,max")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--serve-args", default="", help="with --start: extra `serve` arguments")
    p.add_argument("--device", help="device label for the results (default: this machine's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text kept in the results (e.g. which code)")
    p.add_argument("--out", type=Path, help="JSON path (default results/serving-<device>.json)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: N 1,4 at 4 req/s for 3 s, short requests; without --url or --start, "
        "starts a server on the tiny test Llama",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n_adapters, args.rate_fractions, args.duration, args.warmup = "1,4", "0.5", 3.0, 1.0
        args.concurrency, args.saturation_requests = 4, 8
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
    model: str
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
    models: list[str],
    weights: list[float],
    rate: float,
    args,
    duration: float | None = None,
    count: int | None = None,
) -> list[tuple]:
    """(arrival s, model, prompt token ids, max_tokens); the same seed gives the same lengths
    and popularity ranks. Ends after ``duration`` seconds of arrivals or ``count`` requests."""
    rng = random.Random(args.seed)
    pmin, pmax = _ints(args.prompt_tokens)
    omin, omax = _ints(args.output_tokens)
    out, t = [], rng.expovariate(rate)
    while t < (args.duration if duration is None else duration) and len(out) != count:
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
                return Outcome(model, None, None, 0, time.perf_counter(), f"{r.status_code}")
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
        return Outcome(model, None, None, 0, time.perf_counter(), type(e).__name__)
    ttft = None if first is None else first - start
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Outcome(model, ttft, tpot, tokens, time.perf_counter())


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


async def run_closed(url: str, plan: list[tuple], concurrency: int) -> tuple[list[Outcome], float]:
    """``concurrency`` requests in flight until the plan is answered (arrival times ignored)."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=limits, headers=headers()
    ) as client:
        t0 = time.perf_counter()
        jobs, outcomes = iter(plan), []

        async def worker():
            for _, model, prompt, max_tokens in jobs:  # one shared iterator
                outcomes.append(await one_request(client, model, prompt, max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, t0


def service_level_lines(url: str) -> list[str]:
    """The per-adapter series of the server's ``/metrics`` at the end of the run (an example
    scrape, kept in the results)."""
    with httpx.Client(base_url=url, timeout=60, headers=headers()) as client:
        text = client.get("/metrics").text
    keep = ("vllm_lora_ext_adapter", "vllm_lora_ext_adapters_resident")
    return [line for line in text.splitlines() if line.startswith(keep)]


def worker_loads(client: httpx.Client) -> dict[str, float] | None:
    """The worker's adapter loads so far, from ``/metrics`` (None on a server without them)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    if r.status_code != 200:
        return None
    out = {}
    for family in text_string_to_metric_families(r.text):
        if family.name == "vllm_lora_ext_adapter_load_seconds":
            for sample in family.samples:
                path = sample.labels.get("path")
                if sample.name.endswith("_count"):
                    out[f"loads_{path}"] = sample.value
                elif sample.name.endswith("_sum"):
                    out[f"{path}_s"] = sample.value
    return out or None


def load_delta(before: dict | None, after: dict | None) -> dict[str, float | None]:
    keys = ("loads_ahead", "loads_in_step", "ahead_s", "in_step_s")
    if before is None or after is None:
        return dict.fromkeys(keys)
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


def ttft_by_decile(outcomes: list[Outcome], names: list[str]) -> list[dict]:
    """TTFT p50/p99 per popularity decile of the adapters (decile 1: the most popular tenth)."""
    rank = {name: i for i, name in enumerate(names)}
    groups: dict[int, list[float]] = {}
    for o in outcomes:
        if o.error is None and o.ttft is not None and o.model in rank:
            groups.setdefault(rank[o.model] * 10 // len(names) + 1, []).append(o.ttft)
    return [
        {"decile": d, "requests": len(v), "ttft_p50_ms": _pct(v, 0.5), "ttft_p99_ms": _pct(v, 0.99)}
        for d, v in sorted(groups.items())
    ]


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
        "span_s": span,
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

    rows = report["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    sat = sorted((r for r in rows if r["kind"] == "saturation"), key=lambda r: r["n_adapters"])
    adapters = [r for r in sat if r["n_adapters"] > 0]
    left.plot([r["n_adapters"] for r in adapters], [r["throughput_tok_s"] for r in adapters], "o-")
    base = [r["throughput_tok_s"] for r in sat if r["n_adapters"] == 0]
    left.axhline(sum(base) / len(base), ls=":", color="gray", label="base only (mean of runs)")
    left.set_xscale("log", base=2)
    left.set(xlabel="adapters (N)", ylabel="output tokens/s", title="capacity (closed loop)")
    left.legend()
    opened = [r for r in rows if r["kind"] == "open"]
    if opened:
        top = max(r["rate"] for r in opened)
        for r in sorted((r for r in opened if r["rate"] == top), key=lambda r: r["n_adapters"]):
            xs = r["ttft_ms"]
            if xs:
                label = "base" if r["n_adapters"] == 0 else f"N={r['n_adapters']}"
                right.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
        right.set(xlabel="TTFT (ms)", ylabel="fraction of requests",
                  title=f"TTFT CDF at {top:.2f} req/s (open loop)")  # fmt: skip
        right.legend()
    fig.suptitle(f"{report['model']} on {report['device']}, {report['settings']['popularity']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(args, base_name: str, names: list[str]) -> list[dict]:
    """The saturation rows (base first: its capacity sets the open-loop rates), then the
    open-loop rows; the same draws of lengths and popularity ranks for every N."""
    rows: list[dict] = []
    client = httpx.Client(base_url=args.url, timeout=60, headers=headers())

    def row(kind: str, n: int, outcomes_t0, loads_before, **extra) -> dict:
        stats = summarise(*outcomes_t0)
        r = {"kind": kind, "n_adapters": n, **extra, **stats}
        r.update(load_delta(loads_before, worker_loads(client)))
        if n >= 10:
            r["ttft_by_decile"] = ttft_by_decile(outcomes_t0[0], names[:n])
        rows.append(r)
        return r

    def population(n: int) -> tuple[list[str], list[float]]:
        """The models of an N row and their popularity (N = 0: the base alone)."""
        if n == 0:
            return [base_name], [1.0]
        return names[:n], popularity(n, args.popularity, args.zipf_s)

    count = args.saturation_requests
    # The base runs first and again last: the machine's speed drifts, and the ratio of each N
    # is to the mean of the two.
    for n in [0, *_ints(args.n_adapters), 0]:
        plan = schedule(*population(n), 1.0, args, duration=float("inf"), count=count)
        before = worker_loads(client)
        r = row("saturation", n, asyncio.run(run_closed(args.url, plan, args.concurrency)), before)
        r["requests_per_s"] = r["requests"] / r["span_s"]
        r["repeat"] = n == 0 and len(rows) > 1
    sat = [r for r in rows if r["kind"] == "saturation"]
    bases = [r["throughput_tok_s"] for r in sat if r["n_adapters"] == 0]
    base = statistics.mean(bases)
    for r in sat:
        r["ratio_to_base"] = r["throughput_tok_s"] / base
        # Against the faster and the slower base run: how far the drift alone moves the ratio.
        r["ratio_range"] = [r["throughput_tok_s"] / max(bases), r["throughput_tok_s"] / min(bases)]
        n, tok_s, ratio = r["n_adapters"], r["throughput_tok_s"], r["ratio_to_base"]
        print(f"saturation N={n}: {tok_s:.1f} tok/s ({ratio:.2f}x base)", flush=True)
    capacity = statistics.mean(r["requests_per_s"] for r in sat if r["n_adapters"] == 0)
    rates = _floats(args.rates) or [f * capacity for f in _floats(args.rate_fractions)]
    for rate in rates:
        for n in [0, *_ints(args.n_adapters)]:
            plan = schedule(*population(n), rate, args)
            before = worker_loads(client)
            r = row("open", n, asyncio.run(run_load(args.url, plan)), before, rate=rate,
                    rate_fraction=rate / capacity)  # fmt: skip
            print(f"open {rate:.2f} req/s N={n}: TTFT p50/p99 {r['ttft_p50_ms']}/"
                  f"{r['ttft_p99_ms']} ms", flush=True)  # fmt: skip
    client.close()
    return rows


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
        asyncio.run(run_load(args.url, schedule(warm, [1.0] * len(warm), 4.0, args, args.warmup)))
        rows = measure(args, base_name, names)
        scrape = service_level_lines(args.url)
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
        "metrics_sample": scrape,
        "run_note": args.note,
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
