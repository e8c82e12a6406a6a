"""The CPU LoRA path end to end: more adapters than slots, and ours vs vLLM's wrapper."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_generation import peft_greedy, vllm_greedy
from tiny_model import random_lora_tensors, tiny_serve_args, write_adapter

from vllm_lora_ext.server_process import Server, start_server

N_ADAPTERS = 32  # with --max-loras 4 and --max-cpu-loras 8: slots and CPU cache both overflow
PROMPT = (9, 30, 2, 77, 150, 4, 61)


def register_all(srv: Server, dirs: dict[str, Path]) -> None:
    with srv.client() as c:
        for name, d in dirs.items():
            r = c.post("/v1/adapters", json={"name": name, "path": str(d)})
            assert r.status_code == 201, r.text


def serve_all(srv: Server, models: list[str]) -> dict[str, list[int]]:
    with srv.client(timeout=600) as c, ThreadPoolExecutor(16) as pool:
        outs = pool.map(lambda m: vllm_greedy(c, m, PROMPT), models)
        return dict(zip(models, outs, strict=True))


@pytest.fixture(scope="module")
def many_adapters(server, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    dirs = {
        f"many-{i:02d}": write_adapter(root / f"a{i}", random_lora_tensors(1000 + i), server.base)
        for i in range(N_ADAPTERS)
    }
    register_all(server, dirs)
    yield dirs
    with server.client() as c:
        for name in dirs:
            c.delete(f"/v1/adapters/{name}")


@pytest.fixture(scope="module")
def served_by_ours(server, many_adapters) -> dict[str, list[int]]:
    return serve_all(server, [server.base, *many_adapters])


def test_server_uses_our_wrapper(server, served_by_ours):
    assert "Using GroupedPunicaWrapperCPU" in server.log.read_text(errors="replace")


def test_more_adapters_than_slots_match_peft(server, tiny_model_dir, many_adapters, served_by_ours):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert served_by_ours[server.base] == peft_greedy(base, PROMPT)
    for name, directory in many_adapters.items():
        model = PeftModel.from_pretrained(base, directory).eval()
        assert served_by_ours[name] == peft_greedy(model, PROMPT), name
        base = model.unload()
    assert len({tuple(v) for v in served_by_ours.values()}) == N_ADAPTERS + 1


def test_same_tokens_as_vllm_wrapper(
    tiny_model_dir, tmp_path_factory, many_adapters, served_by_ours
):
    srv = start_server(
        tmp_path_factory.mktemp("vllm-wrapper"),
        base="tiny-llama",
        serve_args=tiny_serve_args(tiny_model_dir),
        env={"VLLM_LORA_EXT_CPU_PUNICA": "vllm"},
        allowed_paths=[tmp_path_factory.getbasetemp()],
    )
    try:
        assert "Using PunicaWrapperCPU" in srv.log.read_text(errors="replace")
        register_all(srv, many_adapters)
        assert serve_all(srv, [srv.base, *many_adapters]) == served_by_ours
    finally:
        srv.stop()
