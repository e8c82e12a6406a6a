"""A merge from an adapter pool for a new task, with the controls that keep it honest.

``pool_merge`` runs the whole recipe of :mod:`vllm_lora_ext.merge.adaptive` on a base model
folder and a few labelled target examples, and beside the result computes, on the same
held-out target examples (answer cross-entropy, lower is better):

- ``base``: the base model alone;
- ``uniform``: the selected adapters averaged with weights 1/k (the exact mean of their ΔW);
- ``random_pool``: the same method (same k, steps, seed) over adapters with the selected ones'
  shapes, ranks and per-factor norms but random directions (:func:`adaptive.random_like`);
- ``fresh_lora``: a new LoRA trained by :func:`training.train_lora` on the same training rows
  for the same number of steps and batch size (``fresh_rank``, ``fresh_lr``).

The target examples are split once, seeded: ``heldout_fraction`` of them (at least 1) only
score, the rest train. The result says plainly whether the merge beat the fresh LoRA.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge import adaptive as ad
from vllm_lora_ext.merge.params import MergeParams
from vllm_lora_ext.training import LoraHyperparameters, Row, attach_lora, train_lora

MIN_EXAMPLES = 8
Method = Literal["adaptive", "lorahub"]
# (phase, done, total)
Progress = Callable[[str, int, int], None]


class PoolMergeParams(MergeParams):
    """What ``adaptive`` and ``lorahub`` share: selection, data split, controls."""

    k: int = Field(default=3, ge=1, le=64, description="adapters kept from the pool")
    selection: ad.Selection = "evaluation"
    steps: int = Field(default=100, ge=1, le=5000)
    batch: int = Field(default=8, ge=1, le=256)
    seed: int = 0
    heldout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    max_len: int = Field(default=256, ge=8, le=4096, description="longer examples are dropped")
    controls: bool = True
    fresh_rank: int = Field(default=8, ge=1, le=256)
    fresh_lr: float = Field(default=1e-3, gt=0.0, le=1.0)


class AdaptiveParams(PoolMergeParams):
    """Coefficient learning: ``steps`` AdamW steps at ``lr`` on the θ (see adaptive.py)."""

    lr: float = Field(default=5e-2, gt=0.0, le=10.0)
    granularity: ad.Granularity = "adapter"
    negative_slope: float = Field(default=0.01, ge=0.0, le=1.0)


class LorahubParams(PoolMergeParams):
    """LoraHub: ``steps`` is the number of loss evaluations of the gradient-free search."""

    steps: int = Field(default=40, ge=1, le=5000)
    l1: float = Field(default=0.05, ge=0.0)
    population: int = Field(default=8, ge=2, le=64)


PARAMS: dict[str, type[PoolMergeParams]] = {"adaptive": AdaptiveParams, "lorahub": LorahubParams}


@dataclass
class PoolMergeResult:
    merged: LoraWeights
    selected: list[str]
    scores: dict[str, float]
    weights: dict[str, float]
    """Per selected adapter: its coefficient averaged over modules (and rank components)."""
    losses: list[float]
    examples: dict[str, int]
    controls: dict[str, dict[str, float]] = field(default_factory=dict)
    adapters: dict[str, LoraWeights] = field(default_factory=dict)
    """The adapter behind each row of ``controls`` (all but ``base``), e.g. to score on a task."""
    beat_fresh_lora: bool | None = None
    verdict: str = ""

    def report(self) -> dict[str, Any]:
        """JSON-ready: everything but the weights."""
        return {
            "selected": self.selected,
            "selection_scores": self.scores,
            "weights": self.weights,
            "final_train_loss": self.losses[-1] if self.losses else None,
            "examples": self.examples,
            "controls": self.controls,
            "beat_fresh_lora": self.beat_fresh_lora,
            "verdict": self.verdict,
        }


def split_rows(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, held-out): a seeded permutation, at least one row on each side."""
    if len(rows) < 2:
        raise ValueError("need at least 2 examples to hold one out")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return [rows[i] for i in order[n_held:]], [rows[i] for i in order[:n_held]]


def pool_merge(
    model_dir: Path,
    pool: Mapping[str, LoraWeights],
    examples: Sequence[tuple[str, str]],
    method: Method,
    params: PoolMergeParams,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PoolMergeResult:
    """Select, merge, fold (and run the controls) for ``examples`` = (input, output) pairs."""
    from transformers import AutoTokenizer

    from vllm_lora_ext.training import distillation_rows

    if not 1 <= params.k <= len(pool):
        raise ValueError(f"k={params.k} but the pool holds {len(pool)} adapters")
    tell = progress or (lambda phase, done, total: None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, too_long = distillation_rows(tokenizer, examples, params.max_len)
    if len(rows) < MIN_EXAMPLES:
        raise ValueError(
            f"{len(rows)} usable target examples ({too_long} longer than max_len "
            f"{params.max_len}); at least {MIN_EXAMPLES} are needed"
        )
    train, heldout = split_rows(rows, params.heldout_fraction, params.seed)
    started = time.monotonic()
    base = ad.load_base(model_dir)
    names = list(pool)
    tell("selecting", 0, len(names))
    chosen, scores = ad.select(
        base, [pool[n] for n in names], train, params.k, params.selection, pad, params.seed
    )
    selected = [pool[names[i]] for i in chosen]
    coefficients, losses = _run_method(
        base, selected, train, method, params, pad, tell, should_stop
    )
    merged = ad.fold(selected, coefficients)
    result = PoolMergeResult(
        merged=merged,
        selected=[names[i] for i in chosen],
        scores={n: s for n, s in zip(names, scores, strict=True)},
        weights=_mean_weights(selected, [names[i] for i in chosen], coefficients),
        losses=losses,
        examples={"train": len(train), "heldout": len(heldout), "too_long": too_long},
    )
    merge_row = _scored(base, selected, coefficients, train, heldout, pad, started)
    result.controls[method] = merge_row
    result.adapters[method] = merged
    if not params.controls:
        return result
    t = time.monotonic()
    result.controls["base"] = {
        "train_loss": ad.rows_loss(base, train, pad),
        "heldout_loss": ad.rows_loss(base, heldout, pad),
        "seconds": time.monotonic() - t,
    }
    t = time.monotonic()
    uniform = ad.uniform_coefficients(selected, [1.0 / len(selected)] * len(selected))
    result.controls["uniform"] = _scored(base, selected, uniform, train, heldout, pad, t)
    result.adapters["uniform"] = ad.fold(selected, uniform)
    tell("random pool", 0, params.steps)
    t = time.monotonic()
    fakes = ad.random_like(selected, params.seed + 1)
    fake_coefficients, _ = _run_method(base, fakes, train, method, params, pad, None, should_stop)
    result.controls["random_pool"] = _scored(base, fakes, fake_coefficients, train, heldout, pad, t)
    result.adapters["random_pool"] = ad.fold(fakes, fake_coefficients)
    result.controls["fresh_lora"], result.adapters["fresh_lora"] = _fresh_lora(
        model_dir, selected, train, heldout, params, pad, tell, should_stop
    )
    mine, fresh = merge_row["heldout_loss"], result.controls["fresh_lora"]["heldout_loss"]
    result.beat_fresh_lora = mine < fresh
    result.verdict = (
        f"The {method} merge {'beat' if mine < fresh else 'did NOT beat'} a fresh rank-"
        f"{params.fresh_rank} LoRA trained on the same {len(train)} examples for the same "
        f"{params.steps} steps: held-out answer loss {mine:.3f} vs {fresh:.3f} (lower is "
        f"better; base {result.controls['base']['heldout_loss']:.3f}, uniform average "
        f"{result.controls['uniform']['heldout_loss']:.3f}, same method over random adapters "
        f"{result.controls['random_pool']['heldout_loss']:.3f}; {len(heldout)} held-out examples)."
    )
    return result


def _run_method(
    base: Any,
    adapters: list[LoraWeights],
    train: list[Row],
    method: Method,
    params: PoolMergeParams,
    pad: int,
    tell: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[ad.Coefficients, list[float]]:
    if method == "adaptive":
        assert isinstance(params, AdaptiveParams)
        learned = ad.learn_coefficients(
            base,
            adapters,
            train,
            pad,
            steps=params.steps,
            lr=params.lr,
            batch=params.batch,
            seed=params.seed,
            granularity=params.granularity,
            slope=params.negative_slope,
            on_step=None if tell is None else lambda s, _: tell("learning", s, params.steps),
            should_stop=should_stop,
        )
        return learned.coefficients, learned.losses
    assert isinstance(params, LorahubParams)
    if tell is not None:
        tell("searching", 0, params.steps)
    found = ad.lorahub_search(
        base,
        adapters,
        train,
        pad,
        budget=params.steps,
        l1=params.l1,
        population=params.population,
        seed=params.seed,
        should_stop=should_stop,
    )
    return ad.uniform_coefficients(adapters, found.weights), found.trace


def _scored(
    base: Any,
    adapters: list[LoraWeights],
    coefficients: ad.Coefficients,
    train: list[Row],
    heldout: list[Row],
    pad: int,
    started: float | None = None,
) -> dict[str, float]:
    t = time.monotonic() if started is None else started
    with ad.attached(base, adapters) as wrappers:
        for module, wrapper in wrappers.items():
            wrapper.fixed = coefficients[module]
        out = {
            "train_loss": ad.rows_loss(base, train, pad),
            "heldout_loss": ad.rows_loss(base, heldout, pad),
        }
    return out | {"seconds": time.monotonic() - t}


def _fresh_lora(
    model_dir: Path,
    selected: list[LoraWeights],
    train: list[Row],
    heldout: list[Row],
    params: PoolMergeParams,
    pad: int,
    tell: Progress,
    should_stop: Callable[[], bool] | None,
) -> tuple[dict[str, float], LoraWeights]:
    from peft import get_peft_model_state_dict

    t = time.monotonic()
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for a in selected for m in a.modules()}))
    hp = LoraHyperparameters(
        rank=params.fresh_rank,
        alpha=2.0 * params.fresh_rank,
        targets=targets,
        steps=params.steps,
        batch=params.batch,
        lr=params.fresh_lr,
        seed=params.seed,
    )
    model = attach_lora(ad.load_base(model_dir), hp)
    train_lora(
        model,
        train,
        hp,
        pad,
        on_step=lambda s, _: tell("fresh lora", s, params.steps),
        should_stop=should_stop,
    )
    row = {
        "train_loss": ad.rows_loss(model, train, pad),
        "heldout_loss": ad.rows_loss(model, heldout, pad),
        "seconds": time.monotonic() - t,
    }
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return row, LoraWeights(tensors, hp.rank, hp.alpha)


def _mean_weights(
    adapters: list[LoraWeights], names: list[str], coefficients: ad.Coefficients
) -> dict[str, float]:
    groups = ad.rank_groups(adapters, "adapter")
    sums = [0.0] * len(adapters)
    for c in coefficients.values():
        for i in range(len(adapters)):
            sums[i] += float(c[groups == i].mean())
    return {n: s / max(1, len(coefficients)) for n, s in zip(names, sums, strict=True)}
