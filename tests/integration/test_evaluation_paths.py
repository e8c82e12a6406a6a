"""The evaluation harness scores the same through a real vLLM server as through PEFT in-process."""

from __future__ import annotations

import pytest
from test_generation import upload
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.evaluation.backends import HttpBackend, TransformersBackend
from vllm_lora_ext.evaluation.evaluate import collect_outputs, compare_outputs, score_outputs
from vllm_lora_ext.evaluation.tasks import Example, Task, TaskFormat

WORDS = ["one two", "three four five", "Paris is", "The quick brown", "eleven twelve", "Rome"]


def hand_task(mode: str) -> Task:
    if mode == "multiple_choice":
        examples = [
            Example(w, ("capital",), ("capital", "fox", "number seven"), (1.0, 0.0, 0.0))
            for w in WORDS
        ]
    else:
        examples = [Example(w, ("four five six",)) for w in WORDS]
    return Task("hand", mode, TaskFormat(), (), (), tuple(examples), seed=0, dropped=0)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def eval_adapter(server, tmp_path_factory):
    d = write_adapter(tmp_path_factory.mktemp("eval") / "ev", random_lora_tensors(77), server.base)
    with server.client() as c:
        assert upload(c, "eval-a", d).status_code == 201
    yield d
    with server.client() as c:
        c.delete("/v1/adapters/eval-a")


@pytest.mark.parametrize("mode", ["multiple_choice", "generate"])
@pytest.mark.parametrize("with_adapter", [False, True])
def test_http_and_transformers_paths_agree(
    server, tiny_model_dir, eval_adapter, mode, with_adapter
):
    task = hand_task(mode)
    local = TransformersBackend.from_pretrained(
        tiny_model_dir, eval_adapter if with_adapter else None
    )
    remote = HttpBackend(
        server.url,
        "eval-a" if with_adapter else server.base,
        local.tokenizer,
        headers=server.headers,
    )
    ours, theirs = collect_outputs(task, remote), collect_outputs(task, local)
    agreement = compare_outputs(ours, theirs)
    assert agreement.same_prediction == 1.0
    assert agreement.max_logprob_diff < 1e-3
    assert score_outputs(task, ours) == score_outputs(task, theirs)


def test_http_sampling_is_seeded_per_prompt_on_a_real_server(server, tiny_model_dir):
    """Migration's synthesis samples through the server: a seed per prompt makes two identical
    prompts differ within a call, and the same call reproducible."""
    from transformers import AutoTokenizer

    backend = HttpBackend(
        server.url,
        server.base,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        headers=server.headers,
    )
    prompt = [12, 250, 3, 3, 91, 40]
    a = backend.generate([prompt, prompt], 12, [], temperature=1.0, seed=10)
    b = backend.generate([prompt, prompt], 12, [], temperature=1.0, seed=10)
    greedy = backend.generate([prompt], 12, [])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert a[0].token_ids != a[1].token_ids
    assert greedy[0].token_ids != a[0].token_ids or greedy[0].token_ids != a[1].token_ids


def test_served_teacher_distributions_equal_transformers(server, tiny_model_dir, eval_adapter):
    """Token-level distillation reads a served teacher's top-k from vLLM's prompt log-probs:
    the same tokens and log-probs as the adapter's logits in PEFT (float32)."""
    local = TransformersBackend.from_pretrained(tiny_model_dir, eval_adapter)
    remote = HttpBackend(server.url, "eval-a", local.tokenizer, headers=server.headers)
    requests = [([5, 17, 99, 3], [40, 41, 42]), ([7, 250], [300, 8, 9, 10, 11])]
    k = 20
    ours, theirs = (
        remote.continuation_top_logprobs(requests, k),
        local.continuation_top_logprobs(requests, k),
    )
    assert [len(d) for d in ours] == [len(c) for _, c in requests] == [len(d) for d in theirs]
    for a, b in zip((p for d in ours for p in d), (p for d in theirs for p in d), strict=True):
        assert len(a) == len(b) == k
        assert max(a, key=a.get) == max(b, key=b.get)
        common = a.keys() & b.keys()
        assert len(common) >= k - 2  # a near-tie may swap the k-th token
        assert max(abs(a[i] - b[i]) for i in common) < 1e-3
