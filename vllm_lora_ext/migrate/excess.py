"""A training-free filter: keep the synthetic inputs on which the old adapter matters most.

TiTok (arXiv 2510.04682) scores a synthetic example by its *contrastive excess*: how much more
likely the old base + adapter (the teacher) finds the teacher's answer than the old base alone
does, averaged over the answer's tokens. An input whose answer the base would give anyway carries
little of the adapter's skill; one where the adapter changes the answer carries most. Both
models are already served for the migration (generator and teacher), so the filter costs two
scoring passes and no training. We rank a pool of synthetic inputs by it and keep the top.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_lora_ext.evaluation.backends import Backend
from vllm_lora_ext.evaluation.prompts import answer_ids
from vllm_lora_ext.migrate.queries import query_prompt


def excess_scores(
    base: Backend, adapted: Backend, inputs: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """Per (input, answer): mean over the answer's tokens of log p_adapted - log p_base.

    Both backends must share a tokenizer (the old base's), as they do in a migration."""
    tok = adapted.tokenizer
    requests = []
    for text, answer in zip(inputs, answers, strict=True):
        prompt = query_prompt(tok, text)
        requests.append((prompt.ids, answer_ids(tok, prompt, answer)))
    with_adapter = adapted.continuation_logprobs(requests)
    without = base.continuation_logprobs(requests)
    return [(sum(a) - sum(b)) / len(a) for a, b in zip(with_adapter, without, strict=True)]


def top_by_excess(inputs: Sequence[str], scores: Sequence[float], keep: int) -> list[str]:
    """The ``keep`` highest-scoring inputs, in their original (seeded) order."""
    ranked = sorted(range(len(inputs)), key=lambda i: scores[i], reverse=True)[:keep]
    return [inputs[i] for i in sorted(ranked)]
