"""Evaluation harness: scoring, prompts, and both backends on a tiny model (the task suite
itself: tests/unit/test_tasks.py).

No server: a mock transport answering in vLLM's ``/v1/completions`` shape stands in for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from vllm_lora_ext.evaluation.backends import BackendError, HttpBackend, TransformersBackend
from vllm_lora_ext.evaluation.evaluate import (
    collect_outputs,
    compare_outputs,
    evaluate,
    score_outputs,
)
from vllm_lora_ext.evaluation.prompts import answer_ids, build_prompt, stop_token_ids
from vllm_lora_ext.evaluation.scoring import (
    choose_option,
    exact_match,
    multiple_choice_correct,
    normalize,
    option_probabilities,
    wilson_interval,
)
from vllm_lora_ext.evaluation.tasks import Example, Task, TaskFormat


def test_choose_option_by_summed_loglikelihood() -> None:
    # The one-token option has the best first token but the lower total: the sum decides.
    options = [[-0.5, -0.5, -0.5], [-0.1, -2.0], [-1.2]]
    assert choose_option(options) == 2
    assert multiple_choice_correct(options, correct=[2])
    assert not multiple_choice_correct(options, correct=[0, 1])
    assert choose_option([[-1.0], [-1.0]]) == 0
    with pytest.raises(ValueError):
        choose_option([])


def test_option_probabilities_are_a_softmax_and_uniform_when_no_option_is_possible() -> None:
    inf = float("-inf")
    probs = option_probabilities([[-1.0, -1.0], [-0.5], [inf]])  # sums -2, -0.5, -inf
    total = math.exp(-2.0) + math.exp(-0.5)
    assert probs == pytest.approx([math.exp(-2.0) / total, math.exp(-0.5) / total, 0.0])
    assert option_probabilities([[inf], [-1.0, inf]]) == [0.5, 0.5]


def test_exact_match_normalisation() -> None:
    assert normalize("  Gelatine   Stick.\n") == "gelatine stick"
    assert exact_match("Plausible!", ["plausible"])
    assert exact_match(" 3 ", ["three", "3"])
    assert exact_match("-12", ["-12"]) and not exact_match("12", ["-12"])
    assert not exact_match("3 apples", ["3"])
    assert not exact_match("", ["3"])
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and wilson_interval(0, 10)[0] == 0.0


def _task(mode: str, examples: list[Example], **fmt: object) -> Task:
    return Task("t", mode, TaskFormat(**fmt), (), (), tuple(examples), seed=0, dropped=0)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.from_pretrained(tiny_model_dir, batch_size=3)


def test_prompt_uses_the_chat_template(tiny: TransformersBackend) -> None:
    tok = tiny.tokenizer
    example = Example("Is two plus two four?", ("yes",), ("yes", "no"), (1.0, 0.0))
    task = _task("multiple_choice", [example], task_prefix="Answer.", output_prefix="\nYes/no? ",
                 append_choices=True)  # fmt: skip
    text = tok.decode(build_prompt(tok, task, example).ids)
    assert text.startswith("<|im_start|>user\nAnswer.Is two plus two four?\n  choice: yes")
    assert text.endswith("Yes/no?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


def test_prompt_without_chat_template_falls_back_to_q_a(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    example = Example("What is 1 plus 1?", ("2",))
    prompt = build_prompt(tok, _task("generate", [example]), example)
    assert tok.decode(prompt.ids).endswith("Q: What is 1 plus 1?\nA:")
    assert tok.decode(answer_ids(tok, prompt, "2")) == " 2"


def test_transformers_logprobs_match_one_sequence_at_a_time(tiny: TransformersBackend) -> None:
    import torch

    tok = tiny.tokenizer
    seqs = [tok("one two three")["input_ids"], tok("Paris is the capital of France")["input_ids"]]
    requests = [(s[:2], s[2:]) for s in seqs] + [(seqs[1][:1], seqs[1][1:3])]
    got = tiny.continuation_logprobs(requests)
    for (ctx, cont), lps in zip(requests, got, strict=True):
        ids = torch.tensor([[*ctx, *cont]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0], -1)
        want = [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)]
        assert lps == pytest.approx(want, abs=1e-5)
        assert all(x <= 0 for x in lps)


def test_known_multiple_choice_item_through_evaluate(tiny: TransformersBackend) -> None:
    # An option that extends another by more tokens has a lower summed log-likelihood (every
    # token adds a log-prob < 0), so the short option is the known right choice.
    tok = tiny.tokenizer
    short, long = "one two", "one two three four five six"
    example = Example("Count.", (short,), (long, short), (0.0, 1.0))
    task = _task("multiple_choice", [example], append_choices=False)
    prompt = build_prompt(tok, task, example)
    assert answer_ids(tok, prompt, long)[: len(answer_ids(tok, prompt, short))] == answer_ids(
        tok, prompt, short
    )
    result = evaluate(task, tiny)
    assert (result.n, result.correct, result.accuracy, result.predictions) == (1, 1, 1.0, (short,))


def test_greedy_generation_matches_transformers_generate(tiny: TransformersBackend) -> None:
    import torch

    prompt = tiny.tokenizer("Question: what is two plus two?")["input_ids"]
    stops = list(stop_token_ids(tiny.tokenizer))
    ours = tiny.generate([prompt], max_tokens=12, stop_token_ids=stops)[0]
    with torch.no_grad():
        ref = tiny.model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=stops,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
    if ref and ref[-1] in stops:
        ref = ref[:-1]
    assert list(ours.token_ids) == ref and 0 < len(ours.token_ids) <= 12


def fake_vllm(ref: TransformersBackend, seen: list[dict]) -> httpx.Client:
    """A mock ``/v1/completions`` answering in vLLM 0.32's JSON shape, computed by ``ref``."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            choice = {"index": i, "prompt_token_ids": prompt}
            if body.get("prompt_logprobs") is not None:
                lps = ref.continuation_logprobs([(prompt[:1], prompt[1:])])[0]
                pairs = zip(prompt[1:], lps, strict=True)
                entries = [{str(t): {"logprob": lp, "rank": 1}} for t, lp in pairs]
                choice |= {
                    "text": "x",
                    "token_ids": [5],
                    "finish_reason": "length",
                    "prompt_logprobs": [None, *entries],
                }
            else:
                g = ref.generate([prompt], body["max_tokens"], body["stop_token_ids"])[0]
                stopped = len(g.token_ids) < body["max_tokens"]
                ids = [*g.token_ids, *body["stop_token_ids"][:1]] if stopped else list(g.token_ids)
                choice |= {
                    "text": g.text,
                    "token_ids": ids,
                    "finish_reason": "stop" if stopped else "length",
                }
            choices.append(choice)
        return httpx.Response(200, json={"choices": choices[::-1]})

    return httpx.Client(base_url="http://vllm", transport=httpx.MockTransport(handler))


def test_http_backend_speaks_vllm_and_agrees(tiny: TransformersBackend) -> None:
    seen: list[dict] = []
    http = HttpBackend(
        "http://vllm", "math", tiny.tokenizer, batch_size=2, client=fake_vllm(tiny, seen)
    )
    mc = _task(
        "multiple_choice",
        [
            Example(f"Statement {i}", ("plausible",), ("plausible", "implausible"), (1.0, 0.0))
            for i in range(3)
        ],
    )
    a, b = collect_outputs(mc, http), collect_outputs(mc, tiny)
    agreement = compare_outputs(a, b)
    # Batched (padded) vs one at a time: float32 rounding only.
    assert agreement.max_logprob_diff < 1e-5 and agreement.same_prediction == 1.0
    assert evaluate(mc, http).predictions == evaluate(mc, tiny).predictions
    first = seen[0]
    assert first["model"] == "math" and first["prompt_logprobs"] == 0
    assert all(isinstance(t, int) for t in first["prompt"][0]) and len(first["prompt"]) == 2

    gen = _task("generate", [Example("What is 1 plus 1?", ("2",)), Example("Count.", ("3",))])
    a, b = collect_outputs(gen, http), collect_outputs(gen, tiny)
    assert a.generations == b.generations and compare_outputs(a, b).same_prediction == 1.0
    assert seen[-1]["temperature"] == 0.0 and seen[-1]["repetition_penalty"] == 1.0
    assert seen[-1]["stop_token_ids"] == list(stop_token_ids(tiny.tokenizer))
    # Rescore the same outputs against a target equal to the first generation, shouted.
    target = a.generations[0].text.upper() + " ."
    rescored = _task("generate", [Example(gen.heldout[0].input, (target,)), gen.heldout[1]])
    result = score_outputs(rescored, a)
    assert (result.n, result.correct, result.accuracy) == (2, 1, 0.5)


def test_http_backend_samples_seeded_one_prompt_per_request_or_unseeded_in_batches(
    tiny: TransformersBackend,
) -> None:
    """vLLM applies a request's seed to all its prompts: seeded samples go one prompt per
    request (prompt i with seed + i); unseeded ones (``seeded=False``) in batched requests."""
    prompts = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    for seeded, requests, seeds in ((True, 3, [7, 8, 9]), (False, 2, [None, None])):
        seen: list[dict] = []
        http = HttpBackend("http://vllm", "m", tiny.tokenizer, batch_size=2,
                           client=fake_vllm(tiny, seen), seeded=seeded)  # fmt: skip
        out = http.generate(prompts, 3, [], temperature=1.0, seed=7)
        assert len(out) == 3 and len(seen) == requests
        assert [b.get("seed") for b in seen] == seeds
        assert [len(b["prompt"]) for b in seen] == ([1, 1, 1] if seeded else [2, 1])


def test_http_backend_reports_server_errors(tiny: TransformersBackend) -> None:
    client = httpx.Client(
        base_url="http://vllm",
        transport=httpx.MockTransport(lambda r: httpx.Response(404, json={"error": "no"})),
    )
    http = HttpBackend("http://vllm", "missing", tiny.tokenizer, client=client)
    with pytest.raises(BackendError, match="404"):
        http.continuation_logprobs([([1, 2], [3])])
