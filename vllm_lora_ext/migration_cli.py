"""``vllm-lora-ext migrate start | status | rollback``: drive ``/v1/migrations`` from a shell.

``start`` posts the migration to the new server and follows it with a progress bar (five steps
per adapter), printing each adapter's outcome; ``status`` follows or shows a running job;
``rollback`` cancels and restores the old routing. Exit codes: 0 every adapter switched, 1 some
kept on the old server / failed / refused, 2 bad input, 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from vllm_lora_ext.migrate.migrator import STEPS

_DONE_STATES = frozenset({"switched", "kept_old", "failed", "cancelled", "rolled_back"})


def add_migrate_parser(sub: Any, default_url: str) -> None:
    migrate = sub.add_parser(
        "migrate",
        help="carry the adapters of an old server over to a new base (Trans-LoRA)",
        description="Runs on the NEW server: it forwards the old server's adapters until each "
        "one is migrated, checked and switched.",
    )
    migrate.add_argument("--url", default=default_url, help="the new server")
    migrate.add_argument("--timeout", type=float, default=120.0)
    actions = migrate.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start a migration and follow it")
    start.add_argument("--from", dest="source_url", required=True, help="the old server's URL")
    start.add_argument("--source-model", help="base model name the old server must serve")
    start.add_argument("--source-model-path", help="local folder of the old base model")
    start.add_argument("--adapter", action="append", help="migrate only these (repeatable)")
    start.add_argument(
        "--request", type=Path,
        help="JSON file with tasks (descriptions, seeds) and options of the request body",
    )  # fmt: skip
    start.add_argument("--no-follow", action="store_true", help="return once it has started")
    status = actions.add_parser("status", help="show (or follow) a migration")
    status.add_argument("id")
    status.add_argument("--follow", action="store_true")
    rollback = actions.add_parser("rollback", help="cancel and restore the old routing")
    rollback.add_argument("id")
    migrate.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
            if args.action == "start":
                body = _start_body(args)
                if body is None:
                    return 2
                response = client.post("/v1/migrations", json=body)
                if response.status_code != 202:
                    return _refused(response)
                job = response.json()
                print(f"migration {job['id']}: {len(job['adapters'])} adapters from "
                      f"{job['source_url']} ({job['source_base']})")  # fmt: skip
                return 0 if args.no_follow else follow(client, job["id"])
            path = f"/v1/migrations/{args.id}"
            if args.action == "rollback":
                response = client.delete(path)
                while response.status_code in (200, 202) and (
                    response.json()["state"] == "rolling_back"
                ):
                    time.sleep(1.0)  # unloads wait for the requests admitted for each adapter
                    response = client.get(path)
            elif args.follow:
                return follow(client, args.id)
            else:
                response = client.get(path)
            if response.status_code != 200:
                return _refused(response)
            print(json.dumps(response.json(), indent=2))
            return 0
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
        return 3


def follow(client: httpx.Client, job_id: str, interval: float = 1.0) -> int:
    """Poll the job with a progress bar until it ends; print each adapter's outcome."""
    from tqdm import tqdm

    job = client.get(f"/v1/migrations/{job_id}").json()
    bar = tqdm(total=len(STEPS) * len(job["adapters"]), unit="step", desc="migrating")
    while True:
        response = client.get(f"/v1/migrations/{job_id}")
        if response.status_code != 200:
            bar.close()
            return _refused(response)
        job = response.json()
        done = sum(_steps_done(a) for a in job["adapters"])
        bar.update(done - bar.n)
        current = next((a for a in job["adapters"] if a["state"] == "running"), None)
        if current is not None and current["progress"]:
            p = current["progress"]
            loss = f"{p['loss']:.3f}" if p["loss"] is not None else "-"
            bar.set_postfix_str(f"{current['name']}: {p['step']} kept {p['kept']} rejected "
                                f"{p['rejected']} train {p['train_step']}/{p['train_steps']} "
                                f"loss {loss}")  # fmt: skip
        if job["state"] != "running":
            break
        time.sleep(interval)
    bar.close()
    for a in job["adapters"]:
        why = f": {a['error']}" if a["error"] else ""
        print(f"  {a['name']}: {a['state']}{why}")
    return 0 if all(a["state"] == "switched" for a in job["adapters"]) else 1


def _steps_done(adapter: dict[str, Any]) -> int:
    if adapter["state"] in _DONE_STATES:
        return len(STEPS)
    progress = adapter.get("progress") or {}
    return len(progress.get("completed", []))


def _start_body(args: argparse.Namespace) -> dict[str, Any] | None:
    body: dict[str, Any] = {}
    if args.request is not None:
        try:
            body = json.loads(args.request.read_text())
        except (OSError, ValueError) as e:
            print(f"error: --request {args.request}: {e}", file=sys.stderr)
            return None
        if not isinstance(body, dict):
            print(f"error: --request {args.request}: not a JSON object", file=sys.stderr)
            return None
    body["source_url"] = args.source_url
    for key in ("source_model", "source_model_path"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    if args.adapter:
        body["adapters"] = args.adapter
    return body


def _refused(response: httpx.Response) -> int:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    print(f"error ({response.status_code}): {message}", file=sys.stderr)
    return 2 if 400 <= response.status_code < 500 else 1
