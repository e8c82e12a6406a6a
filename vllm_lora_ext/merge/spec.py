"""Inline merge names: ``merge:a=0.5,b=0.5`` requested as a model, served as a cat merge.

:meth:`MergeSpec.parse` is the one reading of such a name: the gateway checks a request's name
with it before vLLM sees the request, and the service parses with it again when it builds the
merge, so the two never disagree. A name it refuses raises :class:`Refused` with status 400 and
reason ``non_finite`` (a NaN or infinite weight, as the merge jobs' ``non_finite`` for weights)
or ``invalid_merge`` (anything else: syntax, no term, a name twice, more than
:data:`MAX_TERMS` terms), as ``POST /v1/merges`` answers the same faults.
"""

from __future__ import annotations

import hashlib
import math
import re

from pydantic import BaseModel, ConfigDict, field_validator

from vllm_lora_ext.errors import Refused

PREFIX = "merge:"
MAX_TERMS = 32
"""Sources one inline merge may name (their ranks must also sum to at most the server's
``--max-lora-rank``); bounds the store lookups one request can cause."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
"""A decimal number in ASCII digits (``float`` alone would also take ``1_0``, ``nan``, ``inf``
and other scripts' digits)."""
_NON_FINITE = re.compile(r"[-+]?(?:nan|inf|infinity)", re.IGNORECASE)


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
        """``merge:a=0.5,b=0.5`` -> MergeSpec; :class:`Refused` (400) saying what is wrong."""
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise _invalid(f"a merge name starts with {PREFIX!r}")
        tail = text[len(PREFIX) :]
        if not tail.strip():
            raise _invalid("it names no adapter (merge:adapter=weight,...)")
        parts = tail.split(",")
        if len(parts) > MAX_TERMS:  # before any other work on a long name
            raise _invalid(f"a merge names at most {MAX_TERMS} adapters, this one {len(parts)}")
        terms: dict[str, float] = {}
        for part in parts:
            name, weight = _term(part)
            if name in terms:
                raise _invalid(f"adapter {name!r} appears twice in the merge")
            terms[name] = weight
        return cls(terms=tuple(terms.items()))

    @property
    def canonical(self) -> str:
        return PREFIX + ",".join(f"{n}={w!r}" for n, w in self.terms)

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:24]


def _term(part: str) -> tuple[str, float]:
    """``adapter=weight`` (spaces around it allowed) -> (adapter, finite weight)."""
    name, sep, weight = part.strip().partition("=")
    if not sep or not _NAME.fullmatch(name) or ".." in name:
        raise _invalid(
            f"bad merge term {part[:80]!r}: expected adapter=weight, the adapter named with "
            "1-64 characters from [A-Za-z0-9._-]"
        )
    if _NON_FINITE.fullmatch(weight):
        raise _non_finite(name, weight)
    if not _NUMBER.fullmatch(weight):
        raise _invalid(f"bad weight {weight[:40]!r} for {name!r}: expected a decimal number")
    value = float(weight)
    if not math.isfinite(value):  # 1e999
        raise _non_finite(name, weight)
    return name, value


def _invalid(message: str) -> Refused:
    return Refused("invalid_merge", f"invalid inline merge: {message}")


def _non_finite(name: str, weight: str) -> Refused:
    message = f"the weight of {name!r} ({weight[:40]}) is not a finite number"
    return Refused("non_finite", f"invalid inline merge: {message}")
