"""``"model": "merge:a=0.7,b=-0.3"``: a weighted set of adapters served on the CPU LoRA path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_adapters_api import metric
from test_generation import chat, peft_greedy, upload, vllm_greedy
from tiny_model import random_lora_tensors, write_adapter

PROMPT = (12, 250, 3, 3, 91, 40)
MERGE = "merge:mx-a=0.7,mx-b=-0.3"


@pytest.fixture(scope="module")
def merge_inputs(server, tiny_model_dir, tmp_path_factory):
    """mx-a, mx-b registered; peft-cat = PEFT's own cat merge of them, registered as an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge")
    dirs = {
        name: write_adapter(root / name, random_lora_tensors(seed), base=server.base)
        for name, seed in (("mx-a", 51), ("mx-b", 52), ("mx-c", 53))
    }
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, dirs["mx-a"], adapter_name="mx-a")
    peft.load_adapter(dirs["mx-b"], adapter_name="mx-b")
    peft.add_weighted_adapter(["mx-a", "mx-b"], [0.7, -0.3], "cat", combination_type="cat")
    peft.set_adapter("cat")
    peft.save_pretrained(root / "peft", selected_adapters=["cat"])
    with server.client() as c:
        for name, d in {**dirs, "peft-cat": root / "peft" / "cat"}.items():
            assert upload(c, name, d).status_code == 201, name
    yield peft
    with server.client() as c:
        for name in [*dirs, "peft-cat"]:
            c.delete(f"/v1/adapters/{name}")


def test_merge_in_a_mixed_batch_equals_peft_cat(server, merge_inputs):
    models = [server.base, "mx-a", MERGE, "peft-cat"]
    with server.client() as c, ThreadPoolExecutor(len(models)) as pool:
        out = dict(zip(models, pool.map(lambda m: vllm_greedy(c, m, PROMPT), models), strict=True))
    assert out[MERGE] == out["peft-cat"] == peft_greedy(merge_inputs, PROMPT)
    assert out[MERGE] != out["mx-a"] and out[MERGE] != out[server.base]


BAD_MERGES = [
    # (model, status, reason, in the message)
    ("merge:mx-a=1,nobody=1", 404, "unknown_adapter", "'nobody'"),
    ("merge:mx-a=1,mx-b=1,mx-c=1", 400, "rank_too_high", "rank 24"),  # > --max-lora-rank 16
    ("merge:mx-a=nan", 400, "non_finite", "'mx-a'"),
    ("merge:mx-a=0.5,mx-b=inf", 400, "non_finite", "'mx-b'"),
    ("merge:mx-a=1e999", 400, "non_finite", "'mx-a'"),
    ("merge:mx-a=1,mx-a=2", 400, "invalid_merge", "twice"),
    ("merge:mx-a=", 400, "invalid_merge", "weight"),
    ("merge:mx-a", 400, "invalid_merge", "adapter=weight"),
    ("merge:", 400, "invalid_merge", "no adapter"),
    ("merge:" + ",".join(f"s{i}=1" for i in range(40)), 400, "invalid_merge", "at most"),
]


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_bad_merges_are_refused_before_vllm(server, merge_inputs, route):
    """A malformed inline merge is 400 with its reason, an unknown source 404 naming it, in our
    error shape (vLLM would answer "model does not exist"), counted as a validation failure."""
    with server.client() as c:
        for model, status, reason, text in BAD_MERGES:
            before = metric(c, "vllm_lora_ext_validation_failures_total", reason=reason)
            if route == "completions":
                r = c.post("/v1/completions", json={"model": model, "prompt": [1], "max_tokens": 1})
            else:
                r = chat(c, model, "hi", max_tokens=1)
            assert r.status_code == status, (model, r.text)
            error = r.json()["error"]
            assert (error["reason"], error["code"]) == (reason, status), (model, error)
            assert text in error["message"], (model, error)
            after = metric(c, "vllm_lora_ext_validation_failures_total", reason=reason)
            assert after == before + 1, model
        assert vllm_greedy(c, MERGE, PROMPT)  # the server still serves the good one


def test_deleting_an_adapter_retires_its_merges(server, tmp_path):
    with server.client() as c:
        for name, seed in (("rt-a", 61), ("rt-b", 62)):
            d = write_adapter(tmp_path / name, random_lora_tensors(seed), base=server.base)
            assert upload(c, name, d).status_code == 201
        merge = "merge:rt-a=0.5,rt-b=0.5"
        assert vllm_greedy(c, merge, PROMPT)
        assert merge in {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert c.delete("/v1/adapters/rt-b").status_code == 200
        assert merge not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        r = c.post("/v1/completions", json={"model": merge, "prompt": [1], "max_tokens": 1})
        assert r.status_code == 404
        assert c.delete("/v1/adapters/rt-a").status_code == 200
