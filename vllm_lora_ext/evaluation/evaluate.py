"""Score a task split on a backend: prompts -> raw model outputs -> accuracy.

Raw outputs are kept as their own step (:func:`collect_outputs`) so two backends can be compared
on exactly the same requests (:func:`compare_outputs`) before anything is reduced to a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_lora_ext.evaluation.backends import Backend, Generation
from vllm_lora_ext.evaluation.prompts import answer_ids, build_prompt, stop_token_ids
from vllm_lora_ext.evaluation.scoring import (
    accuracy,
    choose_option,
    exact_match,
    wilson_interval,
)
from vllm_lora_ext.evaluation.tasks import Example, Mode, Task

# Tokens allowed beyond the longest target: an answer longer than that cannot match anyway.
GENERATION_SLACK = 8


@dataclass(frozen=True)
class RawOutputs:
    task: str
    split: str
    mode: Mode
    option_logprobs: tuple[tuple[tuple[float, ...], ...], ...] = ()
    """Multiple choice: [example][option][token] log-probabilities."""
    generations: tuple[Generation, ...] = ()
    """Generation: one greedy generation per example."""
    plain_prompts: bool = False
    """Prompts without a chat template: only the first generated line is the answer."""


@dataclass(frozen=True)
class EvalResult:
    task: str
    split: str
    mode: Mode
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    predictions: tuple[str, ...]
    """The chosen option, or the generated answer, per example."""
    hits: tuple[bool, ...] = ()
    """Per example, whether it was right: two systems on the same examples pair up here."""


@dataclass(frozen=True)
class Agreement:
    max_logprob_diff: float
    """Largest |difference| of a per-token log-probability (0.0 for generation tasks)."""
    same_prediction: float
    """Fraction of examples where both chose the same option / generated the same token ids."""


def generation_budget(task: Task, tokenizer: Any) -> int:
    """``max_tokens`` for a task: its longest target in tokens plus :data:`GENERATION_SLACK`."""
    longest = max(
        len(tokenizer(t, add_special_tokens=False)["input_ids"])
        for e in task.examples
        for t in e.targets
    )
    return longest + GENERATION_SLACK


def _examples(task: Task, split: str, limit: int | None) -> tuple[Example, ...]:
    examples = task.split(split)
    return examples if limit is None else examples[:limit]


def collect_outputs(
    task: Task, backend: Backend, split: str = "heldout", limit: int | None = None
) -> RawOutputs:
    """Ask ``backend`` for what the task's scoring needs on the first ``limit`` split examples."""
    examples = _examples(task, split, limit)
    tok = backend.tokenizer
    prompts = [build_prompt(tok, task, e) for e in examples]
    plain = any(p.answer_prefix for p in prompts)
    if task.mode == "generate":
        gens = backend.generate(
            [p.ids for p in prompts], generation_budget(task, tok), stop_token_ids(tok)
        )
        return RawOutputs(task.name, split, task.mode, generations=tuple(gens), plain_prompts=plain)
    requests = [
        (p.ids, answer_ids(tok, p, option))
        for p, e in zip(prompts, examples, strict=True)
        for option in e.options
    ]
    flat = iter(backend.continuation_logprobs(requests))
    grouped = tuple(tuple(next(flat) for _ in e.options) for e in examples)
    return RawOutputs(task.name, split, task.mode, option_logprobs=grouped, plain_prompts=plain)


def score_outputs(task: Task, outputs: RawOutputs, limit: int | None = None) -> EvalResult:
    """Reduce raw outputs to accuracy against the split's answers."""
    examples = _examples(task, outputs.split, limit)
    if outputs.mode == "generate":
        predictions = [
            g.text.split("\n", 1)[0] if outputs.plain_prompts else g.text
            for g in outputs.generations
        ]
        hits = [exact_match(p, e.targets) for p, e in zip(predictions, examples, strict=True)]
    else:
        chosen = [choose_option(lp) for lp in outputs.option_logprobs]
        predictions = [e.options[c] for c, e in zip(chosen, examples, strict=True)]
        hits = [c in e.correct for c, e in zip(chosen, examples, strict=True)]
    k = sum(hits)
    return EvalResult(
        task=task.name,
        split=outputs.split,
        mode=outputs.mode,
        n=len(hits),
        correct=k,
        accuracy=accuracy(hits),
        ci95=wilson_interval(k, len(hits)),
        predictions=tuple(predictions),
        hits=tuple(hits),
    )


def evaluate(
    task: Task, backend: Backend, split: str = "heldout", limit: int | None = None
) -> EvalResult:
    """Accuracy of ``backend`` on ``task``'s ``split`` (``.accuracy``, ``.n``, and a 95% CI)."""
    return score_outputs(task, collect_outputs(task, backend, split, limit), limit)


def compare_outputs(a: RawOutputs, b: RawOutputs) -> Agreement:
    """How closely two backends agree on the same task, split and limit."""
    if (a.task, a.split, a.mode) != (b.task, b.split, b.mode):
        raise ValueError("outputs of different tasks, splits or modes")
    if a.mode == "generate":
        if len(a.generations) != len(b.generations):
            raise ValueError("outputs of different lengths")
        same = [
            x.token_ids == y.token_ids for x, y in zip(a.generations, b.generations, strict=True)
        ]
        return Agreement(0.0, sum(same) / len(same) if same else 1.0)
    if len(a.option_logprobs) != len(b.option_logprobs):
        raise ValueError("outputs of different lengths")
    diff = 0.0
    same = []
    for ex_a, ex_b in zip(a.option_logprobs, b.option_logprobs, strict=True):
        for opt_a, opt_b in zip(ex_a, ex_b, strict=True):
            diff = max([diff, *(abs(x - y) for x, y in zip(opt_a, opt_b, strict=True))])
        same.append(choose_option(ex_a) == choose_option(ex_b))
    return Agreement(diff, sum(same) / len(same) if same else 1.0)
