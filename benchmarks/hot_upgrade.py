"""The hot upgrade on real models, the way an operator runs it, with clients hammering throughout.

    python benchmarks/hot_upgrade.py                 # SmolLM2 + arithmetic adapter -> Gemma 3 270M
    python benchmarks/hot_upgrade.py --task object_counting --student-steps 40
    python benchmarks/hot_upgrade.py --quick         # smoke run: tiny Llama -> tiny Gemma 3

1. The old server (``vllm-lora-ext serve``, SmolLM2-135M-Instruct) serves the task adapter from
   ``adapters/SmolLM2-135M-Instruct/<task>``; a capture runs while it serves ``--traffic`` train
   inputs as chat requests, so its prompt reservoir fills (the migration's observed inputs).
2. The new server starts on Gemma 3 270M with ``--migrate-from`` the old one, ``--seeds`` seeds
   (train inputs with answers) and the settings of ``benchmarks/migration_quality.py``.
3. From the moment it is healthy until ``--after`` seconds past the end of the migration,
   ``--clients`` threads send chat requests for the adapter (held-out inputs) to the new server;
   every answer, status and route (forwarded to the old server, or served here) is recorded.

Writes ``benchmarks/results/hot_upgrade.json`` and sets ``"hot_upgrade": {"requests", "failed"}``
in ``benchmarks/results/migration_quality.json`` when that file exists. Settings it does not
name are ``migration_quality.py``'s defaults. ``--url`` (with ``--model-dir``) uses a running
server as the old one.

``--quick``: the tiny test Llama (old, with a random "task" adapter) -> the tiny test Gemma 3 on
a synthetic task (``benchmarks/quick.py``), ``seeds_only`` data (a random tiny base writes no
parseable synthetic inputs), a few training steps, 2 s of hammering after the switch; written to
``<tmp>/hot_upgrade_quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import migration_quality  # noqa: E402
import quick  # noqa: E402
from run_record import run_record  # noqa: E402

from vllm_lora_ext.auth import bearer  # noqa: E402
from vllm_lora_ext.files import write_atomic  # noqa: E402
from vllm_lora_ext.server.migrations.forwarding import ROUTED_HEADER  # noqa: E402

SHARED = ("seeds", "seed_split", "reservoir", "target_count", "student_steps", "student_lr",
          "disc_steps", "disc_lr", "batch", "rank", "max_len")  # fmt: skip
"""Settings this script takes from migration_quality.py unless given."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--data", default="filtered", choices=["filtered", "unfiltered", "seeds_only"])
    # Unset: migration_quality.py's default, so both benchmarks migrate the same way.
    p.add_argument("--seeds", type=int)
    p.add_argument(
        "--seed-split", choices=["train", "validation"],
        help="where seeds come from (default: migration_quality.py's, train); validation: "
        "answers the old adapter never saw, so the gate compares student and teacher fairly",
    )  # fmt: skip
    p.add_argument("--reservoir", type=int, help="train inputs served as traffic")
    p.add_argument("--target-count", type=int)
    p.add_argument("--student-steps", type=int)
    p.add_argument("--student-lr", type=float)
    p.add_argument("--disc-steps", type=int)
    p.add_argument("--disc-lr", type=float)
    p.add_argument("--batch", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--max-len", type=int)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument(
        "--pause", type=float, default=0.0,
        help="seconds each client waits between requests (0: back to back, which saturates a "
        "2-core CPU and starves the migration's training)",
    )  # fmt: skip
    p.add_argument("--after", type=float, default=30.0, help="seconds hammered after the switch")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--url", help="a running vllm-lora-ext server as the old one (default: start)")
    p.add_argument("--model-dir", type=Path, help="with --url: the old base model's folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny Llama -> tiny Gemma 3, synthetic task, seeds only, tiny counts",
    )
    args = p.parse_args(argv)
    shared = vars(migration_quality.parse_args([]))
    for key in SHARED:
        if getattr(args, key) is None:
            setattr(args, key, shared[key])
    if args.url and args.model_dir is None:
        p.error("--url needs --model-dir (the old base model's folder)")
    if args.quick:
        if args.data == p.get_default("data"):
            args.data = "seeds_only"
        args.reservoir, args.target_count = min(args.reservoir, 6), min(args.target_count, 4)
        args.student_steps, args.disc_steps = min(args.student_steps, 4), min(args.disc_steps, 2)
        args.student_epochs = None  # the 4 steps above, not a budget in epochs
        args.after = min(args.after, 2.0)
        if args.out == p.get_default("out"):  # a smoke run never overwrites the committed run
            args.out = quick.out_dir("hot_upgrade")
    return args


def spec_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` over migration_quality.py's defaults: the settings ``build_spec`` reads that this
    script does not name (student fit, warmup, votes, ...) are that benchmark's."""
    return argparse.Namespace(**{**vars(migration_quality.parse_args([])), **vars(args)})


class Hammer(threading.Thread):
    """One client: chat requests for ``model`` back to back, each recorded."""

    def __init__(
        self, url: str, model: str, inputs: list[str], max_tokens: int, pause: float = 0.0
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.inputs, self.max_tokens = url, model, inputs, max_tokens
        self.pause = pause
        self.records: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        headers = bearer(os.environ.get("VLLM_API_KEY"))
        with httpx.Client(base_url=self.url, timeout=600, headers=headers) as client:
            i = 0
            while not self.halt.is_set():
                self.records.append(self.request(client, self.inputs[i % len(self.inputs)]))
                i += 1
                self.halt.wait(self.pause)

    def request(self, client: httpx.Client, text: str) -> dict[str, Any]:
        """One chat request: when it started, its status, where it was routed, its seconds."""
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        start = time.monotonic()
        record: dict[str, Any] = {"t": time.time()}
        try:
            r = client.post("/v1/chat/completions", json=body)
            record |= {"status": r.status_code, "routed": r.headers.get(ROUTED_HEADER)}
        except httpx.HTTPError as e:
            record |= {"status": None, "error": repr(e)}
        record["seconds"] = time.monotonic() - start
        return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result, records = run(args, Path(tmp))
    failed = [r for r in records if r["status"] != 200]
    result |= {
        "requests": len(records),
        "failed": len(failed),
        "forwarded": sum(1 for r in records if r.get("routed")),
        "served_here": sum(1 for r in records if r["status"] == 200 and not r.get("routed")),
        "failures": failed[:10],
        "machine": f"{platform.machine()}, 2-core CPU shared with other jobs, no GPU",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "hot_upgrade.json", json.dumps(result, indent=1).encode())
    record_in_quality(args.out / "hot_upgrade.json", args.out / "migration_quality.json")
    state = {a["name"]: a["state"] for a in result["migration"]["adapters"]}
    print(
        f"hot upgrade: {len(records)} requests, {len(failed)} failed, "
        f"{result['forwarded']} forwarded, {result['served_here']} served here; {state}"
    )
    return 0 if not failed else 1


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both servers, the hammering and the migration; the result and every request's record."""
    from transformers import AutoTokenizer

    from vllm_lora_ext.evaluation.prompts import user_message
    from vllm_lora_ext.evaluation.tasks import load_task
    from vllm_lora_ext.migrate.spec import MigrationOptions
    from vllm_lora_ext.server_process import start_server

    m = upgrade_models(args, work)
    old_dir, new_dir, adapter_dir = m.old_dir, m.new_dir, m.adapter_dir
    old_name, new_name, old_args, new_args = m.old_name, m.new_name, m.old_args, m.new_args
    card = adapter_dir / "card.json"  # split as the adapter was trained, so held out stays out
    task = load_task(args.task, seed=json.loads(card.read_text())["seed"] if card.is_file() else 0)
    smol_tok = AutoTokenizer.from_pretrained(old_dir)
    spec = migration_quality.build_spec(spec_args(args), task, args.task, args.data, smol_tok)
    traffic = spec.reservoir
    held_out = [user_message(task, e, chat=True) for e in task.heldout[:32]]
    # The spec's per-adapter fields go with the task, the rest are the job's options.
    options = spec.model_dump(include=set(MigrationOptions.model_fields))
    request = {
        "tasks": {
            args.task: {
                "task_description": spec.task_description,
                "seeds": [s.model_dump() for s in spec.seeds],
                "choice_prefix": spec.choice_prefix,
            }
        },
        "options": options,
    }
    result: dict[str, Any] = {
        "task": args.task,
        "source_base": old_name,
        "target_base": new_name,
        "settings": json.loads(json.dumps(vars(args) | {"out": None}, default=str)),
        "quick": args.quick,
        "api_key": bool(os.environ.get("VLLM_API_KEY")),  # both servers then require it
        "run": run_record(args),
    }
    if args.quick:
        result["note"] = quick.NOTE
    (work / "old").mkdir()
    (work / "new").mkdir()
    old = None
    if args.url is None:
        allowed = adapter_dir.parent if args.quick else ROOT / "adapters"
        old = start_server(work / "old", old_name, old_args, allowed_paths=[allowed])
    old_url = args.url or old.url
    new = None
    hammers: list[Hammer] = []
    try:
        serve_with_capture(old_url, args.task, adapter_dir, traffic, spec.answer_max_tokens)
        (work / "request.json").write_text(json.dumps(request))
        started = time.monotonic()
        new = start_server(
            work / "new",
            new_name,
            [
                "--model",
                str(new_dir),
                "--max-lora-rank",
                "16",
                "--max-model-len",
                "1024",
                *new_args,
                "--migrate-from",
                old_url,
                "--migrate-source-model",
                str(old_dir),
                "--migrate-request",
                str(work / "request.json"),
            ],
            env=NEW_SERVER_ENV,
        )
        result["new_server_start_seconds"] = round(time.monotonic() - started, 1)
        hammers = [
            Hammer(new.url, args.task, held_out, spec.answer_max_tokens, args.pause)
            for _ in range(args.clients)
        ]
        for h in hammers:
            h.start()
        job = follow(new)
        result["migration"] = job
        time.sleep(args.after)
    finally:
        for h in hammers:
            h.halt.set()
        for h in hammers:
            h.join(timeout=600)
        for server in (new, old):
            if server is not None:
                server.stop()
    return result, [r for h in hammers for r in h.records]


@dataclass(frozen=True)
class UpgradeModels:
    """The two bases of an upgrade and the old one's task adapter, with their serve args."""

    old_dir: Path
    new_dir: Path
    adapter_dir: Path
    old_name: str
    new_name: str
    old_args: list[str]
    new_args: list[str]


NEW_SERVER_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "1"}
"""The new server's vLLM CPU worker on core 1: the old one binds to core 0 by default, and two
workers on one core stalled an engine step past vLLM's 300 s execute-model timeout, which kills
the engine (job_isolation's first runs lost their old server this way)."""


def upgrade_models(args: argparse.Namespace, work: Path) -> UpgradeModels:
    """SmolLM2 with the committed task adapter -> Gemma 3 270M; ``--quick``: the tiny Llama with
    a random adapter -> the tiny Gemma 3. ``--model-dir`` names the old base's folder."""
    from vllm_lora_ext.base_models import (
        DEFAULT_MODEL_NAME,
        GEMMA3_270M_NAME,
        ensure_default_model,
        ensure_gemma3_270m,
    )
    from vllm_lora_ext.settings import Settings

    if args.quick:
        quick.isolate(work)
        old_dir = args.model_dir or quick.tiny_llama(work)
        new_dir = quick.tiny_gemma3(work)
        adapter_dir = quick.random_adapter(work / "adapters" / args.task, old_dir, seed=0, rank=8)
        return UpgradeModels(old_dir, new_dir, adapter_dir, old_dir.name, new_dir.name,
                             quick.tiny_serve_args(old_dir), ["--kv-cache-gib", "1"])  # fmt: skip
    settings = Settings()
    old_dir = args.model_dir or ensure_default_model(settings.cache_dir)
    return UpgradeModels(old_dir, ensure_gemma3_270m(settings.cache_dir),
                         ROOT / "adapters" / DEFAULT_MODEL_NAME / args.task, DEFAULT_MODEL_NAME,
                         GEMMA3_270M_NAME, ["--max-lora-rank", "16"], [])  # fmt: skip


def serve_with_capture(
    url: str, name: str, adapter_dir: Path, traffic: list[str], max_tokens: int
) -> None:
    """Register the adapter on the old server and serve ``traffic`` for it while a capture
    runs, so its prompt reservoir holds what a migration learns from."""
    headers = bearer(os.environ.get("VLLM_API_KEY"))
    with httpx.Client(base_url=url, timeout=600, headers=headers) as c:
        c.post("/v1/adapters", json={"name": name, "path": str(adapter_dir)}).raise_for_status()
        c.post(f"/v1/stats/{name}/start", json={}).raise_for_status()
        for text in traffic:
            body = {"model": name, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": text}]}  # fmt: skip
            c.post("/v1/chat/completions", json=body).raise_for_status()
        c.post(f"/v1/stats/{name}/stop").raise_for_status()


def record_in_quality(hot_upgrade: Path, quality: Path) -> None:
    """Copy the request counts into migration_quality.json's ``hot_upgrade`` (if it exists)."""
    if not quality.is_file():
        return
    run = json.loads(hot_upgrade.read_text())
    data = json.loads(quality.read_text())
    data["hot_upgrade"] = {
        "requests": run["requests"],
        "failed": run["failed"],
        "from": "benchmarks/hot_upgrade.py (results/hot_upgrade.json)",
    }
    write_atomic(quality, json.dumps(data, indent=1).encode())


def follow(server: Any, interval: float = 2.0) -> dict[str, Any]:
    """Poll the migration started by --migrate-from until it ends, with a progress line."""
    from tqdm import tqdm

    with server.client(timeout=120) as c:
        (job,) = c.get("/v1/migrations").json()["migrations"]
        bar = tqdm(desc="migrating", unit="poll")
        while job["state"] == "running":
            time.sleep(interval)
            job = c.get(f"/v1/migrations/{job['id']}").json()
            p = job["adapters"][0]["progress"] or {}
            bar.set_postfix_str(
                f"{p.get('step')} kept {p.get('kept')} train "
                f"{p.get('train_step')}/{p.get('train_steps')} loss {p.get('loss')}"
            )
            bar.update()
        bar.close()
    return job


if __name__ == "__main__":
    sys.exit(main())
