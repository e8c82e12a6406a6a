"""The paired accuracy difference's interval: coverage checked by simulation (the truth is known
there), and the symmetries any paired interval must have."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_lora_ext.evaluation.scoring import (
    paired_difference_interval,
    seeds_difference_interval,
    wilson_interval,
)

hits = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200)


@given(hits)
def test_interval_holds_the_estimate_and_turns_over_when_the_models_swap(pairs) -> None:
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    diff, (lo, hi) = paired_difference_interval(first, second)
    assert diff == pytest.approx((sum(first) - sum(second)) / len(pairs))
    assert -1.0 <= lo <= diff + 1e-12 and diff - 1e-12 <= hi <= 1.0
    back, (lo2, hi2) = paired_difference_interval(second, first)
    assert back == pytest.approx(-diff) and lo2 == pytest.approx(-hi) and hi2 == pytest.approx(-lo)


def test_same_hits_give_a_narrow_interval_unlike_the_separate_ones() -> None:
    """Two models that agree on 75 of 77 examples: the paired interval is far narrower than the
    width of either model's own interval (what the overlapping table intervals suggest)."""
    first = [True] * 50 + [True, False] + [False] * 25
    second = [True] * 50 + [False, True] + [False] * 25
    diff, (lo, hi) = paired_difference_interval(first, second)
    own_lo, own_hi = wilson_interval(51, 77)
    assert diff == 0.0 and lo < 0 < hi and hi - lo < (own_hi - own_lo) / 2


def test_coverage_by_simulation() -> None:
    """Correlated paired hits with a known difference, n = 77 (disambiguation_qa's held-out
    size): the 95% interval must hold the true difference on about 95% of draws."""
    rng = random.Random(0)
    # P(both), P(first only), P(second only), P(neither): accuracies 0.65 and 0.68.
    cells = [0.55, 0.10, 0.13, 0.22]
    truth = cells[1] - cells[2]
    draws, covered = 2000, 0
    for _ in range(draws):
        kinds = rng.choices(range(4), weights=cells, k=77)
        first = [k in (0, 1) for k in kinds]
        second = [k in (0, 2) for k in kinds]
        _, (lo, hi) = paired_difference_interval(first, second)
        covered += lo <= truth <= hi
    assert 0.93 <= covered / draws <= 0.98, covered / draws


def test_needs_equal_non_empty_lists() -> None:
    with pytest.raises(ValueError):
        paired_difference_interval([], [])
    with pytest.raises(ValueError):
        paired_difference_interval([True], [True, False])


seed_runs = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=4),
        st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=4),
    )
)


@given(seed_runs)
def test_seeds_difference_is_the_mean_accuracy_gap_and_turns_over(runs) -> None:
    """The paired mean is the difference of the seeds' mean accuracies (computed from the hit
    counts); swapping the systems mirrors the interval."""
    first, second = runs
    n = len(first[0])
    diff, (lo, hi) = seeds_difference_interval(first, second)
    expected = sum(map(sum, first)) / (n * len(first)) - sum(map(sum, second)) / (n * len(second))
    assert diff == pytest.approx(expected, abs=1e-12)
    assert -1.0 <= lo <= diff + 1e-12 and diff - 1e-12 <= hi <= 1.0
    back, (lo2, hi2) = seeds_difference_interval(second, first)
    assert back == pytest.approx(-diff) and lo2 == pytest.approx(-hi) and hi2 == pytest.approx(-lo)


def test_seeds_difference_refuses_runs_it_cannot_pair() -> None:
    with pytest.raises(ValueError):
        seeds_difference_interval([[True, False]], [[True]])
    with pytest.raises(ValueError):
        seeds_difference_interval([], [[True, False]])
    assert seeds_difference_interval([[True, True]], [[True, True]]) == (0.0, (0.0, 0.0))
    assert seeds_difference_interval([[True]], [[False], [True]]) == (0.5, (-1.0, 1.0))
