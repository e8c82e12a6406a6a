"""The one object the plugin keeps on the app: every service of this server, typed.

The endpoint plugin (``vllm_boundary/api/state.py``) builds a :class:`LoraExtState` at start and
sets it as ``app.state.lora_ext`` (None when the server runs without LoRA). Routes take their
service through :func:`depends_on`, the gateway through :func:`lora_ext_state`; no other key on
``app.state`` is ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.adapters.service import AdapterService
from vllm_lora_ext.server.merges.jobs import MergeJobs
from vllm_lora_ext.server.migrations.forwarding import ForwardTable
from vllm_lora_ext.server.migrations.jobs import MigrationJobs
from vllm_lora_ext.server.stats.service import StatsService

STATE_KEY = "lora_ext"
_T = TypeVar("_T")


@dataclass
class LoraExtState:
    """Built in this order at start: each later service uses the earlier ones; a field left
    None is a service this server does not run (routes of its API answer 409)."""

    adapters: AdapterService
    forward: ForwardTable = field(default_factory=ForwardTable)
    """Adapters being migrated, forwarded to the old server; requests admitted per name."""
    stats: StatsService | None = None
    merges: MergeJobs | None = None
    migrations: MigrationJobs | None = None
    residency: asyncio.Task | None = None
    """The poll keeping the residency metrics current."""


def lora_ext_state(app_state: Any) -> LoraExtState | None:
    """Ours on a Starlette ``app.state``; None before start or without LoRA."""
    return getattr(app_state, STATE_KEY, None)


def install(app_state: Any, state: LoraExtState | None) -> None:
    setattr(app_state, STATE_KEY, state)


def depends_on(pick: Callable[[LoraExtState], _T | None]) -> Callable[[Request], _T]:
    """A FastAPI dependency returning one service of the state; when the server runs without
    LoRA (or without that service) every route of its API answers 409."""

    def get(request: Request) -> _T:
        state = lora_ext_state(request.app.state)
        found = pick(state) if state is not None else None
        if found is None:
            raise Refused(
                "lora_disabled",
                "LoRA is not enabled on this server (start it with --enable-lora)",
                409,
            )
        return found

    return get
