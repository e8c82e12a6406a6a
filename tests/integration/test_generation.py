"""Adapters served by a real vLLM server change greedy output and match PEFT + transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from tiny_model import random_lora_tensors, write_adapter

PROMPTS = [(5, 17, 42, 99, 7, 63), (120, 8, 8, 200, 31)]
NEW_TOKENS = 16


def upload(client: httpx.Client, name: str, directory: Path) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    return client.post("/v1/adapters", data={"name": name}, files=files)


def chat(client: httpx.Client, model: str, content: str, max_tokens: int) -> httpx.Response:
    """A greedy chat completion with one user message."""
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        },
    )


def vllm_greedy(client: httpx.Client, model: str, prompt: tuple[int, ...]) -> list[int]:
    r = client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": list(prompt),
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@torch.no_grad()
def peft_greedy(model: torch.nn.Module, prompt: tuple[int, ...]) -> list[int]:
    """The oracle: argmax decoding with a full forward pass per step (no cache, no stopping)."""
    ids = torch.tensor([list(prompt)])
    for _ in range(NEW_TOKENS):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def adapters(server, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-adapters")
    adapters = {}
    with server.client() as c:
        # Four adapters fill all four slots: base tokens must still get no adapter.
        for name, seed in (("gen-a", 11), ("gen-b", 22), ("gen-c", 33), ("gen-d", 44)):
            d = write_adapter(root / name, random_lora_tensors(seed), base=server.base)
            r = upload(c, name, d)
            assert r.status_code == 201, r.text
            adapters[name] = d
    yield adapters
    with server.client() as c:
        for name in adapters:
            c.delete(f"/v1/adapters/{name}")


def test_base_and_adapters_in_one_batch_match_peft(server, tiny_model_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = [server.base, *adapters]
    jobs = [(m, p) for p in PROMPTS for m in models]
    # Concurrent requests, so the engine schedules base and both adapters in the same batches.
    with server.client() as c, ThreadPoolExecutor(len(jobs)) as pool:
        served = dict(zip(jobs, pool.map(lambda j: vllm_greedy(c, *j), jobs), strict=True))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        assert served[(server.base, prompt)] == peft_greedy(base, prompt)
        for name, directory in adapters.items():
            peft_model = PeftModel.from_pretrained(base, directory).eval()
            assert served[(name, prompt)] == peft_greedy(peft_model, prompt), (name, prompt)
            base = peft_model.unload()  # strip the LoRA layers again for the next adapter
        outputs = [served[(m, prompt)] for m in models]
        assert len({tuple(o) for o in outputs}) == len(models), (
            f"an adapter changed nothing: {outputs}"
        )


def test_chat_completion_with_adapter(server, adapters):
    with server.client() as c:
        r = chat(c, "gen-a", "one two three", max_tokens=8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "gen-a"
    assert body["usage"]["completion_tokens"] >= 1
