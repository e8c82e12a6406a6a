"""Layer-input statistics captured from live traffic on a real server, checked against PEFT.

The oracle: transformers + PEFT with forward hooks on the same prompts computes ``XᵀX`` at each
LoRA-targeted layer input; the server's capture, taken from mixed batches (two adapters and the
base model in flight at once), must equal it adapter by adapter.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_adapters_api import metric
from test_generation import upload
from tiny_model import TARGETS, TINY, random_lora_tensors, write_adapter

from vllm_lora_ext.stats.accumulators import InputStats, IterisStats, input_key


def prompts(seed: int, n: int, vocab: int = 200) -> list[list[int]]:
    """Random token ids: no two prompts share a prefix, so vLLM's prefix cache skips nothing."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def complete(client, model: str, prompt: list[int]) -> None:
    # max_tokens=1: only the prompt's prefill passes through the layers.
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 200, r.text


def peft_grams(model_dir, adapter_dir, batch: list[list[int]], name: str) -> IterisStats:
    """``XᵀX`` at every LoRA layer input, summed over ``batch``, with forward hooks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    gram: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(key: str):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            gram[key] = gram.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        return record

    seen: set[str] = set()
    for module_name, module in model.named_modules():
        if module_name.endswith(TARGETS) and hasattr(module, "lora_A"):
            key = input_key(module_name)
            if key not in seen:  # q/k/v share one input: hook one of them
                seen.add(key)
                module.register_forward_pre_hook(hook(key))
    with torch.inference_mode():
        for p in batch:
            model(input_ids=torch.tensor([p]))
    return IterisStats({(name, k): InputStats(g, counts[k]) for k, g in gram.items()})


@pytest.fixture(scope="module")
def capture_adapters(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    dirs = {
        name: write_adapter(root / name, random_lora_tensors(seed), base=server.base)
        for name, seed in (("st-a", 71), ("st-b", 72), ("st-c", 73))
    }
    with server.client() as c:
        for name, d in dirs.items():
            assert upload(c, name, d).status_code == 201, name
    yield dirs
    with server.client() as c:
        for name in dirs:
            c.post(f"/v1/stats/{name}/stop")
            c.delete(f"/v1/stats/{name}")
            c.delete(f"/v1/adapters/{name}")


def test_capture_from_mixed_traffic_equals_peft_hooks(server, capture_adapters):
    traffic = {"st-a": prompts(1, 6), "st-b": prompts(2, 6), server.base: prompts(3, 6)}
    with server.client() as c:
        for name in ("st-a", "st-b"):
            r = c.post(f"/v1/stats/{name}/start", json={"token_budget": 100_000})
            assert r.status_code == 200, r.text
            assert r.json()["capturing"] is True
        jobs = [(m, p) for m, ps in traffic.items() for p in ps]
        random.Random(0).shuffle(jobs)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: complete(c, *job), jobs))
        status = {s["adapter"]: s for s in c.get("/v1/stats").json()["adapters"]}
        exports = {n: c.get(f"/v1/stats/{n}/export") for n in ("st-a", "st-b")}
        kept = c.get("/v1/stats/st-a/prompts").json()
        assert kept["seen"] == 6
        assert sorted(p["prompt"] for p in kept["prompts"]) == sorted(traffic["st-a"])
        for name in ("st-a", "st-b"):
            assert c.post(f"/v1/stats/{name}/stop").status_code == 200
    for name in ("st-a", "st-b"):
        assert exports[name].status_code == 200
        got = IterisStats.from_bytes(exports[name].content)
        want = peft_grams(server.model_dir, capture_adapters[name], traffic[name], name)
        n_tokens = sum(map(len, traffic[name]))
        assert status[name]["live_tokens"] == n_tokens
        assert got.tokens(name) == n_tokens
        # Targets q,k,v,o,down: 3 inputs per layer (qkv, o, down).
        assert got.layers(name) == want.layers(name)
        assert len(got.layers(name)) == 3 * TINY["layers"]
        for key in want.layers(name):
            g, w = got.get(name, key), want.get(name, key)
            assert g.tokens == w.tokens == n_tokens
            err = (g.xtx - w.xtx).norm() / w.xtx.norm()
            assert err < 1e-5, (key, float(err))


def test_token_budget_export_import_and_bad_requests(server, capture_adapters):
    with server.client() as c:
        r = c.post("/v1/stats/st-c/start", json={"token_budget": 25})
        assert r.status_code == 200, r.text
        for p in prompts(4, 5):
            complete(c, "st-c", p)
        r = c.post("/v1/stats/st-c/stop")
        assert r.status_code == 200 and r.json()["held_tokens"] == 25, r.text
        assert metric(c, "vllm_lora_ext_stats_held_tokens", adapter="st-c") == 25
        one = c.get("/v1/stats/st-c/export")
        assert one.status_code == 200
        # Importing our own export doubles every sum: statistics are additive.
        assert c.post("/v1/stats/st-c/import", content=one.content).status_code == 200
        two = IterisStats.from_bytes(c.get("/v1/stats/st-c/export").content)
        single = IterisStats.from_bytes(one.content)
        assert two.tokens("st-c") == 50
        for key in single.layers("st-c"):
            torch.testing.assert_close(two.get("st-c", key).xtx, 2 * single.get("st-c", key).xtx)
        r = c.post("/v1/stats/st-b/import", content=one.content)  # st-c's, not st-b's
        assert r.status_code == 400 and "st-c" in r.json()["error"]["message"]

        assert c.post("/v1/stats/nobody/start").status_code == 404
        r = c.post("/v1/stats/st-c/start", json={"token_budget": 0})
        assert r.status_code == 400 and "token_budget" in r.text
        r = c.post("/v1/stats/st-c/start", json={"sample_rate": 2})
        assert r.status_code == 400
        r = c.post("/v1/stats/st-c/stop")
        assert r.status_code == 409 and r.json()["error"]["reason"] == "not_capturing"
        r = c.post("/v1/stats/st-c/import", content=b"not safetensors")
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_stats"
        r = c.post("/v1/stats/st-a/start", json={"token_budget": 10})
        assert r.status_code == 200
        assert c.delete("/v1/stats/st-a").status_code == 409  # still capturing
        assert c.post("/v1/stats/st-a/stop").status_code == 200
