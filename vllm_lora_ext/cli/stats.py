"""Sum one adapter's traffic statistics over every replica, for a merge on one of them.

Each replica captures ``XᵀX`` only from the requests its load balancer sent it, so before an
IterIS merge the statistics of all replicas are added up (they are sums: :class:`IterisStats`
supports ``+``). ``vllm-lora-ext stats gather`` fetches ``GET /v1/stats/{a}/export`` from each
replica, adds them, and either posts the sum to one replica's ``POST /v1/stats/{a}/import`` or
writes it to a file.

``import`` *adds* to what the target already holds, so a target that is also listed as a source
is not fetched: its own statistics are already there, and fetching them would count them twice.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from vllm_lora_ext.cli.client import (
    EXIT_CODES_HELP,
    Exit,
    client_options,
    exit_for,
    http_client,
    server_message,
)
from vllm_lora_ext.files import write_atomic
from vllm_lora_ext.stats.accumulators import IterisStats

OK, REFUSED, BAD_INPUT, UNREACHABLE, MISSING = (
    Exit.OK, Exit.REFUSED, Exit.BAD_INPUT, Exit.UNREACHABLE, Exit.MISSING
)  # fmt: skip
"""The CLI's shared codes: 1 a server refused (bad export, import refused), 2 bad local input,
3 a replica or the target could not be reached, 4 a replica holds no statistics, 5 a replica
wants a key (--api-key), 6 a server error."""


class GatherFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Gathered:
    stats: IterisStats | None
    """The sum; None when nothing was fetched (every source skipped or excluded)."""
    fetched: list[str]
    skipped: list[str]
    """Replicas without statistics for the adapter (only with ``skip_missing``)."""


def fetch_export(client: httpx.Client, url: str, adapter: str) -> IterisStats | None:
    """One replica's statistics for ``adapter``; None when it holds none (404)."""
    try:
        response = client.get(f"{url}/v1/stats/{adapter}/export")
    except httpx.HTTPError as e:
        raise GatherFailed(UNREACHABLE, f"cannot reach {url}: {e}") from e
    if response.status_code == 404:
        return None
    if not response.is_success:
        raise GatherFailed(
            exit_for(response.status_code),
            f"{url} refused the export ({response.status_code}): {server_message(response)}",
        )
    try:
        stats = IterisStats.from_bytes(response.content)
    except ValueError as e:
        raise GatherFailed(REFUSED, f"{url} sent something that is not statistics: {e}") from e
    others = sorted({a for a, _ in stats.entries} - {adapter})
    if others:
        raise GatherFailed(REFUSED, f"{url} sent statistics of {others}, not of {adapter!r}")
    return stats


def gather(
    client: httpx.Client,
    adapter: str,
    urls: list[str],
    skip_missing: bool = False,
    progress: bool | None = None,
) -> Gathered:
    """Fetch and add ``adapter``'s statistics from every URL, in order.

    A replica without statistics fails the whole gather (exit code 4) unless ``skip_missing``:
    a merge from partial statistics should be a decision, not an accident.
    """
    total: IterisStats | None = None
    fetched: list[str] = []
    skipped: list[str] = []
    # disable=None: a bar on a terminal, nothing in logs.
    disable = True if progress is False else None
    bar = tqdm(urls, desc=f"gather {adapter}", unit="replica", disable=disable)
    for url in bar:
        stats = fetch_export(client, url, adapter)
        if stats is None:
            if not skip_missing:
                raise GatherFailed(
                    MISSING,
                    f"{url} holds no statistics for {adapter!r} (never captured there, or "
                    "unknown adapter); pass --skip-missing to sum the others",
                )
            skipped.append(url)
            continue
        try:
            total = stats if total is None else total + stats
        except ValueError as e:  # shapes differ: replicas serving different bases
            raise GatherFailed(REFUSED, f"{url}: cannot add its statistics: {e}") from e
        fetched.append(url)
    return Gathered(total, fetched, skipped)


def push(client: httpx.Client, url: str, adapter: str, stats: IterisStats) -> dict:
    """Add ``stats`` to what ``url`` holds for ``adapter``; the target's new status."""
    try:
        response = client.post(f"{url}/v1/stats/{adapter}/import", content=stats.to_bytes())
    except httpx.HTTPError as e:
        raise GatherFailed(UNREACHABLE, f"cannot reach the target {url}: {e}") from e
    if not response.is_success:
        raise GatherFailed(
            exit_for(response.status_code),
            f"{url} refused the import ({response.status_code}): {server_message(response)}",
        )
    return response.json()


def _normalise(url: str) -> str:
    return url.rstrip("/")


def run(args: argparse.Namespace) -> int:
    """``vllm-lora-ext stats gather ADAPTER --url U1 --url U2 ... (--into U | --out FILE)``."""
    urls = [_normalise(u) for u in args.url]
    if len(set(urls)) != len(urls):
        print("error: a --url is given twice (it would be counted twice)", file=sys.stderr)
        return BAD_INPUT
    target = _normalise(args.into) if args.into else None
    sources = [u for u in urls if u != target]
    if args.out is not None and args.out.is_dir():
        print(f"error: --out {args.out} is a directory", file=sys.stderr)
        return BAD_INPUT
    try:
        with http_client(args, base_url="") as client:
            result = gather(client, args.adapter, sources, args.skip_missing)
            for url in result.skipped:
                print(f"warning: {url} holds no statistics for {args.adapter!r}", file=sys.stderr)
            if result.stats is None:
                print(f"nothing to add: no source besides the target holds {args.adapter!r}")
                return OK
            tokens = result.stats.tokens(args.adapter)
            if target is not None:
                status = push(client, target, args.adapter, result.stats)
                print(
                    f"added {tokens} tokens from {len(result.fetched)} replicas to {target}: "
                    f"it now holds {status.get('held_tokens')} tokens for {args.adapter!r}"
                )
            else:
                write_atomic(args.out, result.stats.to_bytes())
                print(f"wrote {tokens} tokens from {len(result.fetched)} replicas to {args.out}")
    except GatherFailed as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.code
    return OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``stats`` command group (``gather`` for now)."""
    stats = sub.add_parser("stats", help="traffic statistics across replicas")
    actions = stats.add_subparsers(dest="action", required=True)
    g = actions.add_parser(
        "gather",
        parents=[client_options(None, timeout=300.0)],  # one key for every replica
        help="sum an adapter's statistics over replicas",
        description="GET /v1/stats/ADAPTER/export from every --url, add them, and POST the sum "
        "to --into's /v1/stats/ADAPTER/import (a --url equal to --into is not fetched: import "
        "adds to what the target holds) or write it to --out.",
        epilog=EXIT_CODES_HELP + " (4: a replica holds no statistics)",
    )
    g.add_argument("adapter")
    g.add_argument("--url", action="append", required=True, help="a replica; repeat per replica")
    dest = g.add_mutually_exclusive_group(required=True)
    dest.add_argument("--into", help="replica that receives the sum (then merge there)")
    dest.add_argument("--out", type=Path, help="file for the sum (safetensors, written atomically)")
    g.add_argument("--skip-missing", action="store_true", help="ignore replicas without statistics")
    g.set_defaults(func=run)
