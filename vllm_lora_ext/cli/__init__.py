"""``vllm-lora-ext``: serve a base model with many adapters, and manage them.

One parser, one HTTP client (``client.py``: URL, API key, timeouts, one way to read a server's
answer) and one table of exit codes for every subcommand; each subcommand is a module here.
"""

from __future__ import annotations

import argparse
import sys

from vllm_lora_ext.cli import adapters, merge, migrate, pool_merge, serve, stats
from vllm_lora_ext.cli.client import EXIT_CODES_HELP, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-lora-ext",
        description="Serve one base model with many LoRA adapters on vLLM, and manage them.",
        epilog=EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (serve, adapters, merge, stats, pool_merge, migrate):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "vllm_args", None) and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
