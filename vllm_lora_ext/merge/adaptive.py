"""Adaptive merging from an adapter pool: select k adapters, learn their coefficients, fold.

After "The Appeal and Reality of Recycling LoRAs with Adaptive Merging" (arXiv 2602.12323).
Everything here runs on a base model loaded with transformers (float32, frozen), with the pool
adapters attached as plain tensors; no vLLM, no FastAPI.

**What is learned** (``learn_coefficients``). Per LoRA-targeted module ``m`` and the selected
adapters ``i = 1..k`` (ranks ``r_i``, scalings ``s_i``), the frozen factors are concatenated over
ranks, ``A_m = [s_1 A_1; ...; s_k A_k]`` ([R, in], R = Σ r_i, scaling folded into A) and
``B_m = [B_1 ... B_k]`` ([out, R]), and the module computes

    y = W₀ x + B_m diag(c_m) A_m x,     c_m = LeakyReLU(θ_m)[g],   θ_m = 0 at the start,

with ``g`` mapping each of the R rank components to its coefficient: ``granularity="adapter"``
(default) learns one θ per adapter per module (k·M numbers), ``"rank"`` one per rank component
per module (R·M numbers). Only the θ are trained (AdamW through :func:`training.train_lora`,
cross-entropy on the target answers), lr 5e-2, ~100 steps, as in the paper.

**Why zero-init through LeakyReLU still learns.** y is *linear* in ``c``:
``∂L/∂c_j = ⟨∂L/∂y, B_m[:, j] (A_m x)_j⟩``, which is non-zero because the adapters' factors are
non-zero (unlike a fresh LoRA, where B = 0 blocks A's gradient). And ``∂c/∂θ`` at θ = 0 is
LeakyReLU's slope there: torch takes the negative side's ``negative_slope`` (0.01) at exactly 0,
so the first gradient is small but non-zero, and Adam normalises its size: the first step moves
every θ by ≈ lr. A θ pushed negative keeps a small negative coefficient (slope 0.01), so the
method prefers non-negative combinations without forbidding others. At θ = 0 the model *is*
the base model: learning starts from "use none of the pool".

**Fold** (:func:`fold`): exact; the merged adapter is ``A = A_m``, ``B = B_m diag(c_m)`` (B's
columns scaled), rank R, ``lora_alpha = R`` (scale 1): a normal PEFT adapter that serves the
same function as the unfolded coefficients (to float rounding).

**Selection** (:func:`select`) of the top k of a pool: ``"evaluation"`` — the mean answer
log-likelihood of the target rows under base + adapter (highest first); ``"random"`` — a seeded
sample; ``"cosine"`` — cosine similarity between the adapter's flattened ΔW (all its modules
concatenated; a module it lacks counts as zeros) and the negative gradient of the target loss
with respect to the base weights of those modules, i.e. the first-order direction the target
data wants the weights to move; one backward pass for the whole pool.

**LoraHub** (:func:`lorahub_search`): one weight per adapter, the same in every module, found by a
gradient-free seeded evolution strategy (nevergrad is not a dependency) minimising target loss +
``l1 · Σ|w_i|``, started from uniform weights ``1/k`` and elitist (never worse than its start);
folded the same way.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge.cat import cat_merge
from vllm_lora_ext.merge.methods import check_shapes
from vllm_lora_ext.training import LoraHyperparameters, Row, answer_loss, padded_batches, train_lora

Granularity = Literal["adapter", "rank"]
Selection = Literal["evaluation", "random", "cosine"]
PEFT_PREFIX = "base_model.model."
# module -> coefficient per rank component [R] of the concatenated factors
Coefficients = dict[str, torch.Tensor]


class CoefficientLinear(torch.nn.Module):
    """``base(x) + ((x @ A.T) * c) @ B.T`` with ``c = LeakyReLU(θ)[groups]`` or fixed values."""

    def __init__(
        self,
        base: torch.nn.Module,
        a: torch.Tensor,  # [R, in], scalings folded in
        b: torch.Tensor,  # [out, R]
        groups: torch.Tensor,  # [R] long, index into theta
        slope: float,
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", a.float(), persistent=False)
        self.register_buffer("b", b.float(), persistent=False)
        self.register_buffer("groups", groups, persistent=False)
        self.theta = torch.nn.Parameter(torch.zeros(int(groups.max()) + 1))
        self.slope = slope
        self.fixed: torch.Tensor | None = None
        """[R] coefficients used instead of θ (evaluation, LoraHub, controls)."""

    def coefficients(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        return torch.nn.functional.leaky_relu(self.theta, self.slope)[self.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x @ self.a.T) * self.coefficients()) @ self.b.T


def model_module(peft_module: str) -> str:
    """PEFT key prefix -> transformers submodule name (``base_model.model.`` dropped)."""
    return peft_module.removeprefix(PEFT_PREFIX)


def load_base(model_dir: Any) -> Any:
    """The base model in float32, eval mode, every weight frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def rank_groups(adapters: Sequence[LoraWeights], granularity: Granularity) -> torch.Tensor:
    """[R] index of each concatenated rank component's coefficient."""
    ranks = torch.tensor([ad.rank for ad in adapters])
    if granularity == "rank":
        return torch.arange(int(ranks.sum()))
    return torch.repeat_interleave(torch.arange(len(adapters)), ranks)


@contextlib.contextmanager
def attached(
    model: Any,
    adapters: Sequence[LoraWeights],
    granularity: Granularity = "adapter",
    slope: float = 0.01,
) -> Iterator[dict[str, CoefficientLinear]]:
    """Wrap every module the adapters target in a :class:`CoefficientLinear` (θ = 0); yields
    ``{peft module: wrapper}`` and puts the original modules back on exit."""
    if not adapters:
        raise ValueError("need at least one adapter")
    check_shapes(adapters)
    cat = cat_merge(adapters, [1.0] * len(adapters))
    groups = rank_groups(adapters, granularity)
    wrappers: dict[str, CoefficientLinear] = {}
    originals: dict[str, torch.nn.Module] = {}
    try:
        for module in cat.modules():
            name = model_module(module)
            parent, _, leaf = name.rpartition(".")
            original = model.get_submodule(name)
            wrapper = CoefficientLinear(
                original,
                cat.tensors[f"{module}.lora_A.weight"],
                cat.tensors[f"{module}.lora_B.weight"],
                groups,
                slope,
            )
            setattr(model.get_submodule(parent), leaf, wrapper)
            originals[name], wrappers[module] = original, wrapper
        yield wrappers
    finally:
        for name, original in originals.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, original)


def set_fixed(wrappers: dict[str, CoefficientLinear], per_adapter: Sequence[float]) -> None:
    """Every module uses coefficient ``per_adapter[i]`` for all of adapter i's rank components
    (needs wrappers built with ``granularity="adapter"``)."""
    for wrapper in wrappers.values():
        values = torch.tensor([float(w) for w in per_adapter], dtype=torch.float32)
        wrapper.fixed = values[wrapper.groups]


def current_coefficients(wrappers: dict[str, CoefficientLinear]) -> Coefficients:
    return {m: w.coefficients().detach().clone() for m, w in wrappers.items()}


def fold(adapters: Sequence[LoraWeights], coefficients: Coefficients) -> LoraWeights:
    """One ordinary adapter (rank Σ r_i, scale 1) equal to the coefficients applied unfolded:
    A = [s_i A_i] stacked, B = [B_i] side by side with column j scaled by ``c[j]``."""
    cat = cat_merge(adapters, [1.0] * len(adapters))
    tensors = dict(cat.tensors)
    for module in cat.modules():
        c = coefficients[module].float()
        key = f"{module}.lora_B.weight"
        if c.shape != (cat.rank,):
            raise ValueError(f"{module}: {tuple(c.shape)} coefficients for rank {cat.rank}")
        tensors[key] = tensors[key] * c[None, :]
    return LoraWeights(tensors=tensors, rank=cat.rank, lora_alpha=float(cat.rank))


def uniform_coefficients(adapters: Sequence[LoraWeights], weights: Sequence[float]) -> Coefficients:
    """Coefficients that give adapter i weight ``weights[i]`` in every module (uniform 1/k:
    the exact average of the adapters' ΔW)."""
    values = torch.tensor([float(w) for w in weights])[rank_groups(adapters, "adapter")]
    cat = cat_merge(adapters, [1.0] * len(adapters))
    return {m: values.clone() for m in cat.modules()}


def rows_loss(model: Any, rows: Sequence[Row], pad: int, batch: int = 16) -> float:
    """Mean cross-entropy over all answer tokens of ``rows`` (each row once, no gradient)."""
    if not rows:
        raise ValueError("no rows to score")
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            ids, mask, labels = next(padded_batches(chunk, len(chunk), 1, 0, pad))
            n = float((labels[:, 1:] != -100).sum())
            total += float(answer_loss(model, ids, mask, labels)) * n
            count += n
    return total / count


def select(
    model: Any,
    pool: Sequence[LoraWeights],
    rows: Sequence[Row],
    k: int,
    how: Selection,
    pad: int,
    seed: int = 0,
) -> tuple[list[int], list[float]]:
    """Indices of the k chosen pool adapters (best first) and every adapter's score (higher is
    better: mean answer log-likelihood, cosine similarity, or 0 for random)."""
    if not 1 <= k <= len(pool):
        raise ValueError(f"k={k} but the pool holds {len(pool)} adapters")
    if how == "random":
        return random.Random(seed).sample(range(len(pool)), k), [0.0] * len(pool)
    if how == "evaluation":
        scores = []
        for adapter in pool:
            with attached(model, [adapter]) as wrappers:
                set_fixed(wrappers, [1.0])
                scores.append(-rows_loss(model, rows, pad))
    elif how == "cosine":
        scores = _cosine_scores(model, pool, rows, pad)
    else:
        raise ValueError(f"unknown selection {how!r}")
    order = sorted(range(len(pool)), key=lambda i: -scores[i])
    return order[:k], scores


def _cosine_scores(
    model: Any, pool: Sequence[LoraWeights], rows: Sequence[Row], pad: int
) -> list[float]:
    modules = sorted({m for ad in pool for m in ad.modules()})
    weights = {m: model.get_submodule(model_module(m)).weight for m in modules}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        n_total = sum(len(ids) - start for ids, start in rows)
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            ids, mask, labels = next(padded_batches(chunk, len(chunk), 1, 0, pad))
            n = float((labels[:, 1:] != -100).sum())
            (answer_loss(model, ids, mask, labels) * n / n_total).backward()
        want = {m: -w.grad.float() for m, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
    want_norm = math.sqrt(sum(float(g.square().sum()) for g in want.values()))
    scores = []
    for adapter in pool:
        dot = sq = 0.0
        for m in adapter.modules():
            delta = adapter.delta(m)
            dot += float((delta * want[m]).sum())
            sq += float(delta.square().sum())
        scores.append(dot / (math.sqrt(sq) * want_norm) if sq and want_norm else 0.0)
    return scores


@dataclass
class Learned:
    coefficients: Coefficients
    losses: list[float]


def learn_coefficients(
    model: Any,
    adapters: Sequence[LoraWeights],
    rows: Sequence[Row],
    pad: int,
    steps: int = 100,
    lr: float = 5e-2,
    batch: int = 8,
    seed: int = 0,
    granularity: Granularity = "adapter",
    slope: float = 0.01,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Learned:
    """Train the θ of every module (adapters frozen, θ = 0 at the start) on ``rows`` with
    :func:`training.train_lora` (seeded batches, NaN raises, ``should_stop`` honoured)."""
    hp = LoraHyperparameters(steps=steps, batch=batch, lr=lr, seed=seed)
    with attached(model, adapters, granularity, slope) as wrappers:
        losses = train_lora(model, rows, hp, pad, on_step=on_step, should_stop=should_stop)
        return Learned(current_coefficients(wrappers), losses)


@dataclass
class Searched:
    weights: list[float]
    objective: float
    """Target loss + l1 · Σ|w| at ``weights``."""
    trace: list[float]
    """Best objective after each evaluation."""


def lorahub_search(
    model: Any,
    adapters: Sequence[LoraWeights],
    rows: Sequence[Row],
    pad: int,
    budget: int = 40,
    l1: float = 0.05,
    population: int = 8,
    sigma: float = 0.3,
    bound: float = 1.5,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Searched:
    """Gradient-free search of one weight per adapter (LoraHub): ``budget`` loss evaluations of
    a seeded elitist evolution strategy from uniform ``1/k`` weights, in ``[-bound, bound]``."""
    k = len(adapters)
    g = torch.Generator().manual_seed(seed)
    with attached(model, adapters) as wrappers:

        def objective(w: torch.Tensor) -> float:
            set_fixed(wrappers, w.tolist())
            return rows_loss(model, rows, pad) + l1 * float(w.abs().sum())

        best = torch.full((k,), 1.0 / k)
        best_f = objective(best)
        trace, mean, evals = [best_f], best.clone(), 1
        while evals < budget:
            if should_stop is not None and should_stop():
                raise RuntimeError(f"stopped after {evals} of {budget} evaluations")
            n = min(population, budget - evals)
            cands = (mean + sigma * torch.randn(n, k, generator=g)).clamp(-bound, bound)
            scored = []
            for cand in cands:
                scored.append((objective(cand), cand))
                evals += 1
                if scored[-1][0] < best_f:
                    best_f, best = scored[-1]
                trace.append(best_f)
            scored.sort(key=lambda t: t[0])
            elite = [c for _, c in scored[: max(1, n // 2)]]
            improved = scored[0][0] <= best_f
            mean = torch.stack([best, *elite]).mean(dim=0)
            sigma *= 1.1 if improved else 0.7
    return Searched(best.tolist(), best_f, trace)


def random_like(adapters: Sequence[LoraWeights], seed: int) -> list[LoraWeights]:
    """A control pool: adapters of the same shapes, ranks, alphas and per-factor Frobenius norms
    as ``adapters``, with Gaussian directions (seeded) — "randomly initialised" adapters that
    carry no task, of the same size as the real ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ad in adapters:
        tensors = {}
        for key in sorted(ad.tensors):
            t = ad.tensors[key].float()
            r = torch.randn(t.shape, generator=g)
            tensors[key] = r * (t.norm() / r.norm().clamp_min(1e-12))
        out.append(LoraWeights(tensors, ad.rank, ad.lora_alpha, ad.use_rslora))
    return out
