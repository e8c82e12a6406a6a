"""The CLI's side of the HTTP API: one client, one way to read an answer, one exit-code table.

Every subcommand that talks to a server builds its client here (URL, ``--api-key`` or
``VLLM_API_KEY``, timeout; the options from :func:`client_options`, accepted before and after a
subcommand's action) and turns a server's answer into output or an :class:`CliError`;
:func:`run_command` prints the error as one line and returns its exit code, so no input and no
server answer (401, 404, 5xx, a body that is not JSON, a refused connection) ever ends in a
traceback: anything unforeseen is one line and exit 6.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import httpx

from vllm_lora_ext.auth import bearer

DEFAULT_URL = os.environ.get("VLLM_LORA_EXT_URL", "http://127.0.0.1:8000")
"""Where subcommands talk to by default (``--url`` overrides it)."""


class Exit(IntEnum):
    """Exit codes shared by every subcommand."""

    OK = 0
    REFUSED = 1
    """The server refused a well-formed request (4xx but the ones below), or a job it ran ended
    without success."""
    BAD_INPUT = 2
    """The command line or a local file is wrong; nothing was sent."""
    UNREACHABLE = 3
    """No answer: connection refused, timeout, DNS."""
    MISSING = 4
    """The adapter, job or statistics named do not exist there (404)."""
    UNAUTHORIZED = 5
    """401 / 403: no key, a wrong key, or a route the server disables."""
    SERVER_ERROR = 6
    """5xx, an answer that is not what the API promises, or any other failure nobody foresaw
    (a bug, a local file that cannot be written): one line, never a traceback."""


EXIT_CODES_HELP = (
    "exit codes: 0 done, 1 refused by the server, 2 bad input, 3 unreachable, 4 not found, "
    "5 unauthorized, 6 server error or unexpected failure"
)


class CliError(Exception):
    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def client_options(
    default_url: str | None, timeout: float = 120.0, *, after: bool = False
) -> argparse.ArgumentParser:
    """``--url`` (unless the command names its servers itself), ``--api-key``, ``--timeout``, as
    a parent parser (``parents=[...]``).

    A command with actions (``adapters list``) takes it twice: on its own parser with the
    defaults, and with ``after=True`` on each action's parser, where an option not given leaves
    no attribute (``argparse.SUPPRESS``) instead of overwriting one given before the action with
    its default. So ``adapters --url U list`` and ``adapters list --url U`` are the same.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if after else value

    parser = argparse.ArgumentParser(add_help=False)
    if default_url is not None:
        parser.add_argument(
            "--url", default=default(default_url), help=f"server (default {default_url})"
        )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("VLLM_API_KEY")),
        help="the server's --api-key (default: $VLLM_API_KEY)",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(timeout), help="seconds per request"
    )
    return parser


def http_client(args: argparse.Namespace, base_url: str | None = None) -> httpx.Client:
    url = base_url if base_url is not None else getattr(args, "url", None)
    return httpx.Client(
        base_url=url or "", timeout=args.timeout, headers=bearer(getattr(args, "api_key", None))
    )


def server_message(response: httpx.Response) -> str:
    """The human part of an error answer, whatever its shape: ours and vLLM's
    ``{"error": {"message"}}``, vLLM's 401 ``{"error": "Unauthorized"}``, Starlette's
    ``{"detail"}``, or plain text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]


def exit_for(status: int) -> Exit:
    if status in (401, 403):
        return Exit.UNAUTHORIZED
    if status == 404:
        return Exit.MISSING
    if status >= 500:
        return Exit.SERVER_ERROR
    return Exit.REFUSED


def checked(response: httpx.Response, expect: tuple[int, ...] = (200, 201, 202)) -> Any:
    """The JSON body of an expected answer; :class:`CliError` for anything else."""
    if response.status_code not in expect:
        message = server_message(response)
        if response.status_code == 401:
            message += " (give the server's key with --api-key or VLLM_API_KEY)"
        raise CliError(exit_for(response.status_code), f"error ({response.status_code}): {message}")
    try:
        return response.json()
    except ValueError:
        raise CliError(
            Exit.SERVER_ERROR,
            f"error: {response.request.url} answered {response.status_code} with a body that "
            f"is not JSON: {response.text[:200]!r}",
        ) from None


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; its failures (and the network's) become one line and an exit code."""
    try:
        return int(command(args))
    except CliError as e:
        _say(e.message)
        return int(e.code)
    except httpx.TransportError as e:
        _say(f"error: cannot reach {_url_of(e, args)}: {e or type(e).__name__}")
        return int(Exit.UNREACHABLE)
    except (httpx.HTTPError, KeyError, TypeError) as e:  # an answer not in the API's shape
        _say(f"error: unexpected answer from the server: {type(e).__name__}: {e}")
        return int(Exit.SERVER_ERROR)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a traceback: anything else is one line too
        _say(f"error: unexpected failure: {type(e).__name__}: {e}")
        return int(Exit.SERVER_ERROR)


def _say(message: str) -> None:
    """``message`` as one line on stderr (a server's text or an exception may hold several)."""
    print(" ".join(message.split()) or "error", file=sys.stderr)


def _url_of(e: httpx.TransportError, args: argparse.Namespace) -> str:
    try:
        return str(e.request.url)
    except RuntimeError:  # httpx raises when the error carries no request
        return str(getattr(args, "url", "the server"))
