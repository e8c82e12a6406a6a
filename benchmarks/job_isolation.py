"""What running heavy jobs out of the serving process buys: one server under steady load while
it migrates a real adapter, once per job runner, same machine, same run.

    python benchmarks/job_isolation.py                      # SmolLM2 arithmetic -> Gemma 3 270M
    python benchmarks/job_isolation.py --modes subprocess,ray --clients 2 --student-steps 40
    python benchmarks/job_isolation.py --quick              # tiny Llama -> tiny Gemma 3

The old server (SmolLM2-135M-Instruct) serves the task adapter and captures its traffic, as in
``hot_upgrade.py``. Then, for each mode (``in_process``: a thread of the API server, the path
before jobs; ``subprocess``: a child process, the default; ``ray``: a task on a local Ray head
this script starts), a fresh new server (Gemma 3 270M, its own store, so nothing is resumed) is
put under steady load: ``--clients`` clients stream chat requests for its *base* model (served
there, never forwarded), each pausing ``--pause`` s between requests. After ``--warmup`` s the
migration is posted (``POST /v1/migrations``); while it runs, every request's time to first
token and tokens are recorded, and the API server process's resident memory is sampled.

Per mode: TTFT p50/p99 and throughput of the requests started during the migration, the
migration's wall time, the API server's peak RSS (and the job process's, where it has one).
Jobs get ``--job-threads`` torch threads in every mode (the in-process path shares the API
server's, which merges set to 1). Writes ``benchmarks/results/job_isolation.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import hot_upgrade  # noqa: E402
import migration_quality  # noqa: E402
import quick  # noqa: E402
from run_record import run_record  # noqa: E402

from vllm_lora_ext.auth import bearer  # noqa: E402
from vllm_lora_ext.files import write_atomic  # noqa: E402
from vllm_lora_ext.jobs.ray_runner import local_head  # noqa: E402

MODES = ("in_process", "subprocess", "ray")


class MigrationRefused(RuntimeError):
    """The new server refused the migration request (its reason in the message)."""


def wait_source_idle(url: str, timeout: float = 300.0) -> None:
    """Wait until the old server is healthy and runs or queues no request, so that every mode's
    migration starts from the same source state (a source still busy with an earlier mode's
    teacher requests answered the next POST's check with a timeout: 502)."""
    deadline = time.monotonic() + timeout
    headers = bearer(os.environ.get("VLLM_API_KEY"))
    with httpx.Client(base_url=url, timeout=10, headers=headers) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/health").status_code == 200:
                    metrics = client.get("/metrics").text
                    if busy_requests(metrics) == 0:
                        return
            time.sleep(2.0)
    raise MigrationRefused(f"the old server {url} was not idle and healthy within {timeout:.0f} s")


def busy_requests(metrics: str) -> float:
    """Requests running or waiting, from vLLM's Prometheus text (exact series names: a prefix
    would also count ``vllm:num_requests_waiting_by_reason``)."""
    from prometheus_client.parser import text_string_to_metric_families

    busy = {"vllm:num_requests_running", "vllm:num_requests_waiting"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name in busy
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--data", default="seeds_only", choices=["filtered", "unfiltered", "seeds_only"])
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--reservoir", type=int, default=32, help="train inputs served as traffic")
    p.add_argument("--student-steps", type=int, default=60)
    p.add_argument("--job-threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--pause", type=float, default=1.0, help="seconds between a client's requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the job")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--url", help="a running vllm-lora-ext server as the old one (default: start)")
    p.add_argument("--model-dir", type=Path, help="with --url: the old base model's folder")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, tiny counts")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes: a comma-separated subset of {','.join(MODES)}")
    if args.url and args.model_dir is None:
        p.error("--url needs --model-dir (the old base model's folder)")
    if args.quick:
        args.seeds, args.reservoir = min(args.seeds, 16), min(args.reservoir, 6)
        args.student_steps, args.warmup = min(args.student_steps, 4), min(args.warmup, 2.0)
        args.max_tokens = min(args.max_tokens, 4)
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("job_isolation")
    return args


class StreamingClient(hot_upgrade.Hammer):
    """Streams chat requests for ``model`` with a pause between them; per request: start time,
    time to first token, tokens, status."""

    def request(self, client: httpx.Client, prompt: str) -> dict[str, Any]:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
        record: dict[str, Any] = {"t": time.time(), "ttft": None, "tokens": 0}
        start = time.monotonic()
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                record["status"] = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    delta = (chunk.get("choices") or [{}])[0].get("delta", {})
                    if record["ttft"] is None and delta.get("content"):
                        record["ttft"] = time.monotonic() - start
                    if chunk.get("usage"):
                        record["tokens"] = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            record |= {"status": None, "error": repr(e)}
        record["seconds"] = time.monotonic() - start
        return record


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def api_server_process(server: Any) -> Any:
    """The vLLM API server process (the CLI's child running our endpoint plugin)."""
    import psutil

    cli = psutil.Process(server.proc.pid)
    for child in cli.children(recursive=True):
        if any("vllm.entrypoints" in part for part in child.cmdline()):
            return child
    raise RuntimeError("no vLLM API server process under the CLI")


class MemorySampler(threading.Thread):
    """Peak RSS of the API server process and of any job process under it."""

    def __init__(self, api: Any, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.api, self.every = api, every
        self.api_peak = self.job_peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.halt.is_set():
            try:
                self.api_peak = max(self.api_peak, self.api.memory_info().rss)
                for child in self.api.children(recursive=True):
                    if any("vllm_lora_ext.jobs" in part for part in child.cmdline()):
                        self.job_peak = max(self.job_peak, child.memory_info().rss)
            except psutil.Error:
                pass
            self.halt.wait(self.every)


def one_mode(args: argparse.Namespace, mode: str, ctx: dict[str, Any], work: Path) -> dict:
    """A fresh new server with ``mode``'s runner (``ray``: on a local head started for it),
    under load, migrating; its row."""
    env = {"VLLM_LORA_EXT_JOB_RUNNER": mode, "VLLM_LORA_EXT_JOB_THREADS": str(args.job_threads),
           **hot_upgrade.NEW_SERVER_ENV}  # fmt: skip
    with contextlib.ExitStack() as stack:
        if mode == "ray":
            env["VLLM_LORA_EXT_RAY_ADDRESS"] = stack.enter_context(local_head())
            env["VLLM_LORA_EXT_RAY_NUM_CPUS"] = str(args.job_threads)
        return _under_load(args, mode, ctx, work, env)


def _under_load(
    args: argparse.Namespace, mode: str, ctx: dict[str, Any], work: Path, env: dict[str, str]
) -> dict:
    """The new server started with ``env``, the load, the migration, and what they measured."""
    from vllm_lora_ext.server_process import start_server

    (work / mode).mkdir()
    server = None
    clients: list[StreamingClient] = []
    sampler = None
    try:
        server = start_server(work / mode, ctx["new_name"], ctx["new_args"], env=env)
        sampler = MemorySampler(api_server_process(server))
        sampler.start()
        clients = [StreamingClient(server.url, ctx["new_name"], ctx["prompts"], args.max_tokens,
                                   args.pause) for _ in range(args.clients)]  # fmt: skip
        for c in clients:
            c.start()
        time.sleep(args.warmup)
        idle_peak = sampler.api_peak
        wait_source_idle(ctx["request"]["source_url"])
        with server.client(timeout=120) as c:
            r = c.post("/v1/migrations", json=ctx["request"])
            if r.status_code != 202:  # e.g. the old server too busy to answer: say so, go on
                raise MigrationRefused(f"POST /v1/migrations answered {r.status_code}: {r.text}")
            began = time.time()
            job = r.json()
            while job["state"] == "running":
                time.sleep(1.0)
                job = c.get(f"/v1/migrations/{job['id']}").json()
            ended = time.time()
    finally:
        for c in clients:
            c.halt.set()
        for c in clients:
            c.join(timeout=600)
        if sampler is not None:
            sampler.halt.set()
            sampler.join(timeout=10)
        if server is not None:
            server.stop()
    during = [r for c in clients for r in c.records if began <= r["t"] <= ended]
    ok = [r for r in during if r.get("status") == 200 and r["ttft"] is not None]
    ttfts = [r["ttft"] for r in ok]
    (adapter,) = job["adapters"]
    return {
        "mode": mode,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "throughput_tok_s": sum(r["tokens"] for r in ok) / max(ended - began, 1e-9),
        "requests": len(during),
        "failed": len(during) - len(ok),
        "migration_s": round(ended - began, 1),
        "migration_state": adapter["state"],
        "migration_error": adapter.get("error"),
        "api_server_rss_idle_bytes": idle_peak,
        "api_server_rss_peak_bytes": sampler.api_peak if sampler else None,
        "job_process_rss_peak_bytes": sampler.job_peak if sampler and sampler.job_peak else None,
    } | (_log_tails(server, ctx) if adapter["state"] != "switched" else {})


def _log_tails(server: Any, ctx: dict[str, Any]) -> dict[str, str]:
    """Both servers' last log lines, kept in a row whose migration did not switch."""
    tails = {"new_server_log_tail": server.log_tail(40)[-4000:]}
    if ctx.get("old_server") is not None:
        tails["old_server_log_tail"] = ctx["old_server"].log_tail(40)[-4000:]
    return tails


def context(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Old server (started, or --url) with the adapter and its traffic; the new server's model,
    arguments, load prompts and the migration request. ``old_server``: the one started here, to
    stop (None with --url)."""
    from transformers import AutoTokenizer

    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.tasks import load_task
    from vllm_lora_ext.migrate.spec import MigrationOptions
    from vllm_lora_ext.server_process import start_server

    m = hot_upgrade.upgrade_models(args, work)
    old_dir, new_dir, adapter_dir = m.old_dir, m.new_dir, m.adapter_dir
    card = adapter_dir / "card.json"
    task = load_task(args.task, seed=json.loads(card.read_text())["seed"] if card.is_file() else 0)
    # migration_quality.py's settings, but for the sizes this benchmark names
    sizes = {"seeds": args.seeds, "reservoir": args.reservoir, "student_steps": args.student_steps,
             "student_epochs": None}  # fmt: skip
    spec_args = argparse.Namespace(**{**vars(migration_quality.parse_args([])), **sizes})
    spec = migration_quality.build_spec(
        spec_args, task, args.task, args.data, AutoTokenizer.from_pretrained(old_dir)
    )
    old = None
    if args.url is None:
        allowed = adapter_dir.parent if args.quick else ROOT / "adapters"
        (work / "old").mkdir()
        old = start_server(work / "old", m.old_name, m.old_args, allowed_paths=[allowed])
    old_url = args.url or old.url
    hot_upgrade.serve_with_capture(
        old_url, args.task, adapter_dir, spec.reservoir, spec.answer_max_tokens
    )
    request = {
        "source_url": old_url,
        "source_model_path": str(old_dir),
        "adapters": [args.task],
        "tasks": {
            args.task: {
                "task_description": spec.task_description,
                "seeds": [s.model_dump() for s in spec.seeds],
                "choice_prefix": spec.choice_prefix,
            }
        },
        "options": spec.model_dump(include=set(MigrationOptions.model_fields)),
    }
    prompts = [user_message(task, e, chat=True) for e in task.heldout[:32]]
    ctx = {"new_name": m.new_name, "new_args": ["--model", str(new_dir), "--max-lora-rank", "16",
           "--max-model-len", "1024", *m.new_args], "prompts": prompts, "request": request,
           "old_name": m.old_name, "old_server": old}  # fmt: skip
    return ctx


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    modes = [r["mode"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = [("TTFT p50 / p99 (s)", ["ttft_p50_s", "ttft_p99_s"]),
              ("migration wall time (s)", ["migration_s"]),
              ("API server peak RSS (GiB)", ["api_server_rss_peak_bytes"])]  # fmt: skip
    for ax, (title, keys) in zip(axes, panels, strict=True):
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            scale = 2**30 if key.endswith("bytes") else 1
            values = [(r.get(key) or 0) / scale for r in rows]
            ax.bar([i + k * width for i in range(len(rows))], values, width, label=key)
        ax.set_xticks([i + (len(keys) - 1) * width / 2 for i in range(len(rows))], modes)
        ax.set_title(title, fontsize=9)
    axes[0].legend(["p50", "p99"], fontsize=7)
    fig.suptitle(f"{doc['source_base']} → {doc['target_base']} migration under load "
                 f"({doc['machine']})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import platform

    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ctx = context(args, work)
        old = ctx["old_server"]
        try:
            for mode in args.modes:
                print(f"{mode}: server under load, migrating ...", flush=True)
                try:
                    rows.append(one_mode(args, mode, ctx, work))
                except MigrationRefused as e:  # a row that says why, not a lost run
                    rows.append({"mode": mode, "refused": str(e)[:2000]})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if old is not None:
                old.stop()
    doc = {
        "experiment": "job_isolation",
        "task": args.task,
        "source_base": ctx["old_name"],
        "target_base": ctx["new_name"],
        "rows": rows,
        "load": {"clients": args.clients, "pause_s": args.pause, "max_tokens": args.max_tokens},
        "machine": f"{platform.machine()}, {os.cpu_count()}-core CPU, no GPU",
        "quick": args.quick,
        "run": run_record(args),
    }
    if args.quick:
        doc["note"] = quick.NOTE
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "job_isolation.json", json.dumps(doc, indent=1).encode())
    plot(doc, args.out / "job_isolation.png")
    return 0 if all(r.get("failed") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
