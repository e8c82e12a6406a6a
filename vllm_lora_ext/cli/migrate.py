"""``vllm-lora-ext migrate start | status | rollback``: drive ``/v1/migrations`` from a shell.

``start`` posts the migration to the new server and follows it with a progress bar (five steps
per adapter), printing each adapter's outcome; ``status`` follows or shows a running job;
``rollback`` cancels and restores the old routing. Exit codes: the shared table
(:class:`vllm_lora_ext.cli.client.Exit`); 1 also when some adapter was kept on the old server or
failed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx

from vllm_lora_ext.cli.client import (
    DEFAULT_URL,
    CliError,
    Exit,
    checked,
    client_options,
    http_client,
)
from vllm_lora_ext.migrate.migrator import STEPS

_DONE_STATES = frozenset({"switched", "kept_old", "failed", "cancelled", "rolled_back"})


def add_parser(sub: Any, default_url: str = DEFAULT_URL) -> None:
    migrate = sub.add_parser(
        "migrate",
        help="carry the adapters of an old server over to a new base (Trans-LoRA)",
        description="Runs on the NEW server: it forwards the old server's adapters until each "
        "one is migrated, checked and switched.",
        parents=[client_options(default_url)],
    )
    after = [client_options(default_url, after=True)]  # the same options after the action
    actions = migrate.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start a migration and follow it", parents=after)
    start.add_argument("--from", dest="source_url", required=True, help="the old server's URL")
    start.add_argument("--source-model", help="base model name the old server must serve")
    start.add_argument("--source-model-path", help="local folder of the old base model")
    start.add_argument("--source-api-key", help="the old server's key (default: the new one's)")
    start.add_argument("--adapter", action="append", help="migrate only these (repeatable)")
    start.add_argument(
        "--request", type=Path,
        help="JSON file with tasks (descriptions, seeds) and options of the request body",
    )  # fmt: skip
    start.add_argument("--no-follow", action="store_true", help="return once it has started")
    status = actions.add_parser("status", help="show (or follow) a migration", parents=after)
    status.add_argument("id")
    status.add_argument("--follow", action="store_true")
    rollback = actions.add_parser(
        "rollback", help="cancel and restore the old routing", parents=after
    )
    rollback.add_argument("id")
    migrate.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    with http_client(args) as client:
        if args.action == "start":
            body = _start_body(args)
            job = checked(client.post("/v1/migrations", json=body), expect=(202,))
            print(f"migration {job['id']}: {len(job['adapters'])} adapters from "
                  f"{job['source_url']} ({job['source_base']})")  # fmt: skip
            return Exit.OK if args.no_follow else follow(client, job["id"])
        path = f"/v1/migrations/{args.id}"
        if args.action == "rollback":
            job = checked(client.delete(path))
            while job["state"] == "rolling_back":
                time.sleep(1.0)  # unloads wait for the requests admitted for each adapter
                job = checked(client.get(path))
        elif args.follow:
            return follow(client, args.id)
        else:
            job = checked(client.get(path))
        print(json.dumps(job, indent=2))
        return Exit.OK


def follow(client: httpx.Client, job_id: str, interval: float = 1.0) -> int:
    """Poll the job with a progress bar until it ends; print each adapter's outcome."""
    from tqdm import tqdm

    job = checked(client.get(f"/v1/migrations/{job_id}"))
    bar = tqdm(total=len(STEPS) * len(job["adapters"]), unit="step", desc="migrating")
    while True:
        job = checked(client.get(f"/v1/migrations/{job_id}"))
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
    return Exit.OK if all(a["state"] == "switched" for a in job["adapters"]) else Exit.REFUSED


def _steps_done(adapter: dict[str, Any]) -> int:
    if adapter["state"] in _DONE_STATES:
        return len(STEPS)
    progress = adapter.get("progress") or {}
    return len(progress.get("completed", []))


def _start_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.request is not None:
        try:
            body = json.loads(args.request.read_text())
        except (OSError, ValueError) as e:
            raise CliError(Exit.BAD_INPUT, f"error: --request {args.request}: {e}") from e
        if not isinstance(body, dict):
            raise CliError(Exit.BAD_INPUT, f"error: --request {args.request}: not a JSON object")
    body["source_url"] = args.source_url
    for key in ("source_model", "source_model_path", "source_api_key"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    if args.adapter:
        body["adapters"] = args.adapter
    return body
