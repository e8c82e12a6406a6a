"""The embedded default (SmolLM2-135M-Instruct from its PyPI GGUF) served the way `serve` does."""

from __future__ import annotations

import pytest
from test_generation import chat, upload
from tiny_model import write_adapter

from vllm_lora_ext.adapters.peft_format import tensor_key
from vllm_lora_ext.server_process import start_server

pytestmark = pytest.mark.slow


def smollm2_adapter(seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (576, 576), "v_proj": (576, 192)}
    tensors = {}
    for layer in range(30):
        for module, (fan_in, fan_out) in shapes.items():
            tensors[tensor_key(layer, module, "A")] = torch.randn(8, fan_in, generator=g) * 0.02
            tensors[tensor_key(layer, module, "B")] = torch.randn(fan_out, 8, generator=g) * 0.02
    return tensors


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    # No --model: the CLI converts (once, into the cache) and serves the embedded default.
    srv = start_server(
        tmp_path_factory.mktemp("smollm2"), base="SmolLM2-135M-Instruct", serve_args=[]
    )
    yield srv
    srv.stop()


def test_default_model_answers_chat(smollm2, tmp_path):
    with smollm2.client() as c:
        r = chat(c, "SmolLM2-135M-Instruct", "What is the capital of France?", max_tokens=24)
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]

        # Adapters declaring the Hugging Face id of the base are accepted.
        for name, seed in (("smol-a", 1), ("smol-b", 2)):
            d = write_adapter(
                tmp_path / name,
                smollm2_adapter(seed),
                base="HuggingFaceTB/SmolLM2-135M-Instruct",
                targets=("q_proj", "v_proj"),
            )
            assert upload(c, name, d).status_code == 201
        listing = c.get("/v1/adapters").json()
        print("GET /v1/adapters:", listing)
        assert [a["name"] for a in listing["adapters"]] == ["smol-a", "smol-b"]
        assert all(a["loaded"] and a["rank"] == 8 for a in listing["adapters"])
        r = chat(c, "smol-a", "Hi", max_tokens=8)
        assert r.status_code == 200, r.text
