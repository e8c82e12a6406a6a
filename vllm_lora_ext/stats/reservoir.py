"""A bounded uniform sample of the request prompts served with an adapter (Algorithm R).

IterIS iterations replay these prompts through the engine to pair each token's input under the
adapter with its input under the candidate merge; a uniform sample keeps them representative
of the traffic however long a capture runs, in bounded memory.
"""

from __future__ import annotations

import random
from typing import Any

Prompt = dict[str, Any]
"""``{"prompt": str | list[int]}`` (completions) or ``{"messages": [...]}`` (chat)."""


class Reservoir:
    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("a reservoir holds at least one prompt")
        self.capacity = capacity
        self.items: list[Prompt] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def to_json(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "items": self.items}

    @classmethod
    def from_json(cls, data: dict[str, Any], capacity: int, seed: int = 0) -> Reservoir:
        """A saved reservoir, cut to ``capacity`` (the setting may have shrunk since)."""
        reservoir = cls(capacity, seed)
        items = [p for p in data.get("items", []) if isinstance(p, dict)][:capacity]
        reservoir.items = items
        reservoir.seen = max(int(data.get("seen", len(items))), len(items))
        return reservoir

    def offer(self, item: Prompt) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.items[slot] = item


def prompt_of_body(body: dict[str, Any]) -> list[Prompt]:
    """The replayable prompts of a completions / chat request body (a batch gives several)."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return [{"messages": messages}]
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return [{"prompt": prompt}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return [{"prompt": prompt}]
        if all(isinstance(p, str) and p for p in prompt):
            return [{"prompt": p} for p in prompt]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [{"prompt": p} for p in prompt]
    return []
