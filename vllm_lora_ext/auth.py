"""The API key on calls between servers (a server to itself, a new server to the old one).

vLLM's ``--api-key`` (or ``VLLM_API_KEY``) guards every ``/v1`` route, including the ones this
server calls on itself: IterIS replays, reservoir labelling, synthetic inputs from the new base.
"""

from __future__ import annotations


def bearer(api_key: str | None) -> dict[str, str]:
    """Request headers that present ``api_key`` (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
