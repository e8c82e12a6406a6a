"""The old server, seen from the new one: what it serves and which prompts it has observed.

A migration pulls the adapter list and each adapter's prompt reservoir over HTTP
(``GET /v1/adapters``, ``GET /v1/stats/{adapter}/prompts``) and then uses the same server as
generator and teacher (:class:`~vllm_lora_ext.evaluation.backends.HttpBackend`). Checking the
source up front turns "unreachable" and "serves another model than claimed" into clear refusals
before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class SourceError(RuntimeError):
    """The source server cannot be used; ``status`` and ``reason`` are what to answer with."""

    def __init__(self, message: str, status: int = 502, reason: str = "source_unavailable"):
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class SourceInfo:
    url: str
    base: str
    """The source's base model name (what its ``/v1/adapters`` reports)."""
    served_names: tuple[str, ...]
    """Every model id it answers to (``/v1/models``): base names and adapters."""
    adapters: tuple[str, ...]


def describe_source(
    url: str,
    expected_base: str | None = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> SourceInfo:
    """What ``url`` serves; raises :class:`SourceError` if it is unreachable, is not a
    vllm-lora-ext server, or serves another base than ``expected_base``."""
    url = url.rstrip("/")
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
        adapters = _get_json(client, "/v1/adapters", url)
        models = _get_json(client, "/v1/models", url)
    base = adapters.get("base")
    if not isinstance(base, str):
        raise SourceError(f"{url}/v1/adapters did not name a base model: {adapters}")
    served = tuple(m["id"] for m in models.get("data", []) if isinstance(m, dict) and "id" in m)
    if expected_base is not None and expected_base != base and expected_base not in served:
        raise SourceError(
            f"the source server {url} serves base model {base!r}, not {expected_base!r} "
            f"as claimed (it answers to {', '.join(served) or 'nothing'})",
            409,
            "wrong_source_base",
        )
    names = tuple(a["name"] for a in adapters.get("adapters", []))
    return SourceInfo(url, base, served, names)


def observed_inputs(
    url: str,
    adapter: str,
    tokenizer: Any,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> list[str]:
    """The user-turn texts of the prompts the source observed for ``adapter`` (its reservoir).

    Chat prompts give their last user message, text completions their prompt; token-id prompts
    are decoded with the source's tokenizer. An adapter never captured has an empty reservoir.
    """
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers) as client:
        try:
            response = client.get(f"/v1/stats/{adapter}/prompts")
        except httpx.HTTPError as e:
            raise SourceError(f"cannot reach the source server {url}: {e}") from e
    if response.status_code == 404:
        return []
    if response.status_code != 200:
        raise SourceError(f"{url}/v1/stats/{adapter}/prompts answered {response.status_code}")
    texts = [prompt_text(p, tokenizer) for p in response.json().get("prompts", [])]
    return [t for t in texts if t]


def prompt_text(prompt: dict[str, Any], tokenizer: Any) -> str | None:
    """One reservoir entry (``{"messages": [...]}`` or ``{"prompt": str | [ids]}``) as text."""
    messages = prompt.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _content_text(message.get("content"))
        return None
    value = prompt.get("prompt")
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        return tokenizer.decode(value, skip_special_tokens=True).strip() or None
    return None


def _content_text(content: object) -> str | None:
    if isinstance(content, str):
        return content.strip() or None
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        ]
        return " ".join(parts).strip() or None
    return None


def _get_json(client: httpx.Client, path: str, url: str) -> dict[str, Any]:
    try:
        response = client.get(path)
    except httpx.HTTPError as e:
        raise SourceError(f"cannot reach the source server {url}: {e}") from e
    if response.status_code == 404 and path == "/v1/adapters":
        raise SourceError(
            f"{url} is not a vllm-lora-ext server (no /v1/adapters)", 400, "not_a_source"
        )
    if response.status_code == 401:
        raise SourceError(
            f"{url}{path} answered 401: give the old server's key as source_api_key "
            "(default: this server's own --api-key)",
            400,
            "source_unauthorized",
        )
    if response.status_code != 200:
        raise SourceError(f"{url}{path} answered {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError as e:
        raise SourceError(f"{url}{path} did not answer JSON") from e
