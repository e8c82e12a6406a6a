"""Inline merge names (``merge:a=0.7,b=0.3``): the one parser the gateway and the service share.

A malformed name is refused with 400 and its reason (``non_finite`` for a NaN or infinite
weight, ``invalid_merge`` for anything else), never with another exception.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vllm_lora_ext.errors import Refused
from vllm_lora_ext.merge.spec import MAX_TERMS, PREFIX, MergeSpec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAMES = st.from_regex(NAME, fullmatch=True).filter(lambda n: ".." not in n)
WEIGHTS = st.floats(allow_nan=False, allow_infinity=False, width=64)
TERMS = st.dictionaries(NAMES, WEIGHTS, min_size=1, max_size=MAX_TERMS)
NON_FINITE = st.sampled_from(
    ["nan", "NaN", "-nan", "inf", "+inf", "-inf", "Infinity", "-INFINITY", "1e999", "-2.5e400"]
)


def spec_text(terms: list[tuple[str, str]]) -> str:
    return PREFIX + ",".join(f"{n}={w}" for n, w in terms)


def refusal(text: str) -> Refused:
    with pytest.raises(Refused) as e:
        MergeSpec.parse(text)
    assert e.value.status == 400 and e.value.message
    return e.value


def test_a_spec_is_sorted_and_canonical() -> None:
    spec = MergeSpec.parse("merge:b=0.5,a=-1e-1")
    assert spec.terms == (("a", -0.1), ("b", 0.5))
    assert spec == MergeSpec.parse("merge:a=-0.1, b=0.5") == MergeSpec.parse("merge:a=-.1,b=+5e-1")
    assert spec.canonical == "merge:a=-0.1,b=0.5"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("merge:", "invalid_merge"),
        ("merge: ", "invalid_merge"),
        ("merge:a", "invalid_merge"),
        ("merge:a=", "invalid_merge"),
        ("merge:=1", "invalid_merge"),
        ("merge:a=x", "invalid_merge"),
        ("merge:a=1,", "invalid_merge"),
        ("merge:a=1,,b=1", "invalid_merge"),
        ("merge:a=1=2", "invalid_merge"),
        ("merge:a=1_0", "invalid_merge"),  # float() would take it
        ("merge:a=\u0661", "invalid_merge"),  # an Arabic-Indic digit: float() would take it
        ("merge:a=1,a=2", "invalid_merge"),
        ("merge:../x=1", "invalid_merge"),
        ("merge:a/b=1", "invalid_merge"),
        ("merge:a\n=1", "invalid_merge"),
        ("merge:" + "x" * 65 + "=1", "invalid_merge"),
        ("a=1", "invalid_merge"),
        ("merge:a=nan", "non_finite"),
        ("merge:a=inf", "non_finite"),
        ("merge:a=1,b=-Infinity", "non_finite"),
        ("merge:a=1e999", "non_finite"),
    ],
)
def test_malformed_names_are_refused_with_their_reason(text: str, reason: str) -> None:
    assert refusal(text).reason == reason


@settings(max_examples=200, deadline=None)
@given(terms=TERMS, order=st.randoms(use_true_random=False))
def test_every_valid_spec_parses_to_its_terms_in_any_order(terms, order) -> None:
    items = [(n, repr(w)) for n, w in terms.items()]
    order.shuffle(items)
    spec = MergeSpec.parse(spec_text(items))
    assert spec.terms == tuple(sorted(terms.items()))
    assert MergeSpec.parse(spec.canonical) == spec


@settings(max_examples=200, deadline=None)
@given(terms=TERMS, data=st.data())
def test_a_non_finite_weight_is_non_finite(terms, data) -> None:
    items = [(n, repr(w)) for n, w in terms.items()]
    at = data.draw(st.integers(0, len(items) - 1))
    items[at] = (items[at][0], data.draw(NON_FINITE))
    assert refusal(spec_text(items)).reason == "non_finite"


@settings(max_examples=200, deadline=None)
@given(terms=st.dictionaries(NAMES, WEIGHTS, min_size=1, max_size=MAX_TERMS - 1), data=st.data())
def test_a_name_twice_is_invalid(terms, data) -> None:
    items = [(n, repr(w)) for n, w in terms.items()]
    twice = data.draw(st.sampled_from(items))
    items.insert(data.draw(st.integers(0, len(items))), (twice[0], "1"))
    assert "twice" in refusal(spec_text(items)).message


@settings(max_examples=50, deadline=None)
@given(extra=st.integers(1, 1000))
def test_more_than_max_terms_is_invalid(extra) -> None:
    items = [(f"a{i}", "1") for i in range(MAX_TERMS + extra)]
    assert "at most" in refusal(spec_text(items)).message


GARBAGE_TERMS = st.one_of(
    NAMES,  # no "=weight"
    st.builds(lambda n, w: f"{n}={w}", st.text(max_size=8), WEIGHTS.map(repr)).filter(
        lambda t: not _valid_name(t.partition("=")[0])
    ),
    st.builds(lambda n, w: f"{n}={w}", NAMES, st.text(max_size=8)).filter(
        lambda t: not _number_like(t.partition("=")[2])
    ),
)


def _valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name.strip())) and ".." not in name


def _number_like(weight: str) -> bool:
    """float() would take it after stripping (so not a syntax fault in every case)."""
    try:
        float(weight)
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(terms=TERMS, bad=GARBAGE_TERMS, data=st.data())
def test_a_term_that_is_not_adapter_equals_number_is_invalid(terms, bad, data) -> None:
    items = [f"{n}={w!r}" for n, w in terms.items()]
    items.insert(data.draw(st.integers(0, len(items))), bad)
    text = PREFIX + ",".join(items)
    assume("," not in bad)  # several terms, some maybe valid: the next test covers them
    assert refusal(text).reason == "invalid_merge", text


@settings(max_examples=500, deadline=None)
@given(tail=st.text(max_size=60))
def test_any_name_parses_or_is_refused_with_a_known_reason(tail) -> None:
    try:
        spec = MergeSpec.parse(PREFIX + tail)
    except Refused as e:
        assert e.status == 400 and e.reason in {"invalid_merge", "non_finite"}
        return
    assert 1 <= len(spec.terms) <= MAX_TERMS
    assert all(math.isfinite(w) for _, w in spec.terms)
