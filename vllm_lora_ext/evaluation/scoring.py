"""Scoring as pure functions on numbers and strings (no model, no tokenizer).

Multiple choice is BIG-bench's ``multiple_choice_grade``: the option whose continuation has the
highest summed log-likelihood is the model's choice. Generation is exact match after a light
normalisation, so "Plausible." and " plausible" count the same but "3 apples" is not "3".
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")


def option_loglikelihood(token_logprobs: Sequence[float]) -> float:
    """Summed log-probability of one option's tokens given the prompt."""
    return math.fsum(token_logprobs)


def choose_option(option_logprobs: Sequence[Sequence[float]]) -> int:
    """Index of the option with the highest summed log-likelihood (the first on a tie)."""
    if not option_logprobs:
        raise ValueError("no options to choose from")
    sums = [option_loglikelihood(lp) for lp in option_logprobs]
    return max(range(len(sums)), key=lambda i: (sums[i], -i))


def option_probabilities(option_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """How sure a model is of each option: the softmax of their summed log-likelihoods, i.e.
    each option's probability given that the answer is one of them."""
    sums = [option_loglikelihood(lp) for lp in option_logprobs]
    top = max(sums)
    if top == -math.inf:  # every option impossible: no preference, not NaN
        return [1.0 / len(sums)] * len(sums)
    weights = [math.exp(x - top) for x in sums]
    total = math.fsum(weights)
    return [w / total for w in weights]


def multiple_choice_correct(
    option_logprobs: Sequence[Sequence[float]], correct: Sequence[int]
) -> bool:
    """Whether the chosen option is one of the ``correct`` indices."""
    return choose_option(option_logprobs) in set(correct)


def normalize(text: str) -> str:
    """Strip, lowercase, collapse whitespace, drop trailing punctuation (applied to both sides)."""
    return _SPACES.sub(" ", text.strip().lower()).rstrip(string.punctuation + " ")


def exact_match(prediction: str, targets: Sequence[str]) -> bool:
    """Whether ``prediction`` equals any target after :func:`normalize`."""
    pred = normalize(prediction)
    return any(pred == normalize(t) for t in targets)


def accuracy(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct) if correct else float("nan")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(
    first: Sequence[bool], second: Sequence[bool], z: float = 1.96
) -> tuple[float, tuple[float, float]]:
    """Accuracy of ``first`` minus that of ``second`` on the same examples, with its 95% interval.

    Newcombe's method 10 for paired proportions (Stat. Med. 17:2635, 1998): Wilson intervals of
    both accuracies, combined with the correlation of the two models' hits. On the same held-out
    examples this is much narrower than the two separate intervals suggest, since two models tend
    to get the same easy examples right.
    """
    n = len(first)
    if n == 0 or n != len(second):
        raise ValueError(f"need two equally long, non-empty hit lists (got {n}, {len(second)})")
    both = sum(a and b for a, b in zip(first, second, strict=True))
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    neither = n - both - only_first - only_second
    k1, k2 = both + only_first, both + only_second
    p1, p2 = k1 / n, k2 / n
    (l1, u1), (l2, u2) = wilson_interval(k1, n, z), wilson_interval(k2, n, z)
    margins = k1 * (n - k1) * k2 * (n - k2)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                                 + (u2 - p2) ** 2))  # fmt: skip
    upper = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                                 + (p2 - l2) ** 2))  # fmt: skip
    return diff, (max(-1.0, lower), min(1.0, upper))


def seeds_difference_interval(
    first: Sequence[Sequence[bool]], second: Sequence[Sequence[bool]], z: float = 1.96
) -> tuple[float, tuple[float, float]]:
    """Two systems, each run over several seeds, compared on the same examples: per example,
    the share of ``first``'s seeds right minus the share of ``second``'s, averaged, with the
    normal 95% interval of that paired mean (a seed's run is one replicate, not more examples).
    """
    if not first or not second:
        raise ValueError("need at least one seed's hits on each side")
    n = len(first[0])
    if n < 1 or any(len(h) != n for h in (*first, *second)):
        raise ValueError("need equally long, non-empty hit lists")
    diffs = [
        sum(h[j] for h in first) / len(first) - sum(h[j] for h in second) / len(second)
        for j in range(n)
    ]
    mean = sum(diffs) / n
    if n == 1:
        return mean, (-1.0, 1.0)  # one example says nothing about the spread
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, (max(-1.0, mean - half), min(1.0, mean + half))
