"""``vllm-lora-ext adapters list | add | remove``: manage a server's adapters over HTTP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_lora_ext.cli.client import (
    DEFAULT_URL,
    EXIT_CODES_HELP,
    CliError,
    Exit,
    add_client_arguments,
    checked,
    http_client,
)


def _print(body: object) -> int:
    print(json.dumps(body, indent=2))
    return Exit.OK


def cmd_adapters(args: argparse.Namespace) -> int:
    if args.action == "add" and not Path(args.path).is_dir():
        raise CliError(Exit.BAD_INPUT, f"error: {args.path} is not a directory")
    with http_client(args) as client:
        if args.action == "list":
            return _print(checked(client.get("/v1/adapters")))
        if args.action == "remove":
            return _print(checked(client.delete(f"/v1/adapters/{args.name}")))
        directory = Path(args.path)
        handles = [(p.name, p.open("rb")) for p in sorted(directory.iterdir()) if p.is_file()]
        try:
            files = [("files", (n, f)) for n, f in handles]
            return _print(
                checked(client.post("/v1/adapters", data={"name": args.name}, files=files))
            )
        finally:
            for _, f in handles:
                f.close()


def add_parser(sub: argparse._SubParsersAction) -> None:
    adapters = sub.add_parser(
        "adapters", help="list, add or remove adapters on a server", epilog=EXIT_CODES_HELP
    )
    add_client_arguments(adapters, DEFAULT_URL)
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show registered adapters")
    add = actions.add_parser("add", help="upload a PEFT adapter directory under a name")
    add.add_argument("name")
    add.add_argument("path", help="directory with adapter_config.json + adapter_model.safetensors")
    remove = actions.add_parser("remove", help="unload and delete an adapter")
    remove.add_argument("name")
    adapters.set_defaults(func=cmd_adapters)
