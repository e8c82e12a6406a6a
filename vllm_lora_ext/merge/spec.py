"""Inline merge names: ``merge:a=0.5,b=0.5`` requested as a model, served as a cat merge."""

from __future__ import annotations

import hashlib
import math
import re

from pydantic import BaseModel, ConfigDict, field_validator

PREFIX = "merge:"
_TERM = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})=(?P<weight>[-+0-9.eE]+)$")


class MergeSpec(BaseModel):
    """A weighted set of stored adapters; order-insensitive, so equal merges share one cache."""

    model_config = ConfigDict(frozen=True)

    terms: tuple[tuple[str, float], ...]

    @field_validator("terms")
    @classmethod
    def _valid(cls, terms: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        if not terms:
            raise ValueError("a merge needs at least one adapter")
        names = [n for n, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError("an adapter appears twice in the merge")
        if not all(math.isfinite(w) for _, w in terms):
            raise ValueError("merge weights must be finite")
        return tuple(sorted(terms))

    @classmethod
    def parse(cls, text: str) -> MergeSpec:
        """``merge:a=0.5,b=0.5`` -> MergeSpec; ValueError with the reason otherwise."""
        if not text.startswith(PREFIX):
            raise ValueError(f"a merge name starts with {PREFIX!r}")
        terms = []
        for part in text[len(PREFIX) :].split(","):
            m = _TERM.match(part.strip())
            if m is None or ".." in m["name"]:
                raise ValueError(f"bad merge term {part!r}: expected adapter=weight")
            try:
                terms.append((m["name"], float(m["weight"])))
            except ValueError as e:
                raise ValueError(f"bad weight in {part!r}") from e
        return cls(terms=tuple(terms))

    @property
    def canonical(self) -> str:
        return PREFIX + ",".join(f"{n}={w!r}" for n, w in self.terms)

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:24]
