"""``vllm-lora-ext adapters list | add | remove``: manage a server's adapters over HTTP.

``add NAME DIR`` uploads only what an adapter is, chosen by name: ``adapter_config.json`` and
``adapter_model.safetensors``, plus the optional files the server accepts (a README, a card, a
recipe). Any other file of the folder stays here, so a mistyped path (``~``, ``/etc``, a project
holding ``.env``) sends nothing. A folder without the two files, with a pickle weight file
(``adapter_model.bin``: pickles run code when loaded), or with a chosen file that is a link
leaving the folder is refused here, exit 2, before anything is sent. Each file is read once
into memory, so one that changes while it is read cannot break the request.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_lora_ext.adapters.peft_format import (
    CONFIG_FILE,
    OPTIONAL_FILES,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
)
from vllm_lora_ext.cli.client import (
    DEFAULT_URL,
    EXIT_CODES_HELP,
    CliError,
    Exit,
    checked,
    client_options,
    http_client,
)

UPLOADED_FILES = (CONFIG_FILE, WEIGHTS_FILE, *sorted(OPTIONAL_FILES))
"""What ``add`` sends when present, in this order: the files the server's upload accepts."""
_WEIGHTS_STEM = WEIGHTS_FILE.partition(".")[0]  # adapter_model


def _print(body: object) -> int:
    print(json.dumps(body, indent=2))
    return Exit.OK


def adapter_files(directory: Path) -> list[tuple[str, bytes]]:
    """The files of a PEFT adapter folder that ``add`` uploads, each read once; a
    :class:`CliError` (exit 2) for a folder that is not one."""

    def refuse(why: str) -> CliError:
        return CliError(Exit.BAD_INPUT, f"error: {directory}: {why}; nothing was sent")

    if not directory.is_dir():
        raise CliError(Exit.BAD_INPUT, f"error: {directory} is not a directory")
    try:
        root = directory.resolve(strict=True)
        names = {p.name for p in directory.iterdir()}
        pickles = sorted(
            n for n in names if n.startswith(_WEIGHTS_STEM) and n.lower().endswith(PICKLE_SUFFIXES)
        )
        if pickles:
            raise refuse(
                f"{pickles[0]} is a pickle weight file (pickles run code when loaded); convert "
                f"it to {WEIGHTS_FILE} (safetensors) and remove it"
            )
        missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in names]
        if missing:
            raise refuse(f"not a PEFT adapter folder: no {' and no '.join(missing)}")
        files = []
        for name in UPLOADED_FILES:
            if name not in names:
                continue
            real = (directory / name).resolve()
            if not real.is_relative_to(root):
                raise refuse(f"{name} is a link that leaves the folder (to {real}); copy the file")
            if not real.is_file():
                raise refuse(f"{name} is not a regular file")
            files.append((name, real.read_bytes()))
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise refuse(f"cannot read it: {e}") from e
    return files


def cmd_adapters(args: argparse.Namespace) -> int:
    files = adapter_files(Path(args.path)) if args.action == "add" else []
    with http_client(args) as client:
        if args.action == "list":
            return _print(checked(client.get("/v1/adapters")))
        if args.action == "remove":
            return _print(checked(client.delete(f"/v1/adapters/{args.name}")))
        upload = [("files", file) for file in files]
        return _print(checked(client.post("/v1/adapters", data={"name": args.name}, files=upload)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    adapters = sub.add_parser(
        "adapters",
        help="list, add or remove adapters on a server",
        epilog=EXIT_CODES_HELP,
        parents=[client_options(DEFAULT_URL)],
    )
    after = [client_options(DEFAULT_URL, after=True)]  # the same options after the action
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show registered adapters", parents=after)
    add = actions.add_parser(
        "add",
        help="upload a PEFT adapter folder under a name",
        description="Uploads " + ", ".join(UPLOADED_FILES) + " (those present; the first "
        "two are required) and nothing else of the folder.",
        parents=after,
    )
    add.add_argument("name")
    add.add_argument("path", help="directory with adapter_config.json + adapter_model.safetensors")
    remove = actions.add_parser("remove", help="unload and delete an adapter", parents=after)
    remove.add_argument("name")
    adapters.set_defaults(func=cmd_adapters)
