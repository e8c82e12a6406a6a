"""Our GPU LoRA path inside a real vLLM server: the wrapper's code (metadata, custom op,
rank-exact slots, kernels) serves the tiny model with its Triton kernels interpreted on CPU
(``VLLM_LORA_EXT_CPU_PUNICA=lora_kernels``); base, two adapters of different ranks and an inline
merge in one batch equal PEFT token for token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_generation import peft_greedy, upload, vllm_greedy
from tiny_model import random_lora_tensors, tiny_serve_args, write_adapter

from vllm_lora_ext.server_process import start_server

PROMPT = (12, 250, 3, 3, 91, 40)
RANKS = {"gp-a": 4, "gp-b": 8}
MERGE = "merge:gp-a=0.7,gp-b=-0.3"


@pytest.mark.slow
def test_base_two_ranks_and_a_merge_in_one_batch_equal_peft(tiny_model_dir, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("gpu-path")
    dirs = {
        name: write_adapter(work / name, random_lora_tensors(70 + rank, rank=rank),
                            base="tiny-llama", rank=rank, alpha=2.0 * rank)
        for name, rank in RANKS.items()
    }  # fmt: skip
    srv = start_server(
        work,
        base="tiny-llama",
        serve_args=tiny_serve_args(tiny_model_dir),
        env={"VLLM_LORA_EXT_CPU_PUNICA": "lora_kernels"},
    )
    try:
        assert "LoraKernelsPunicaWrapperInterpreted" in srv.log.read_text(errors="replace")
        models = [srv.base, *RANKS, MERGE]
        with srv.client(timeout=600) as c:
            for name, d in dirs.items():
                assert upload(c, name, d).status_code == 201, name
            with ThreadPoolExecutor(len(models)) as pool:
                served = dict(zip(models, pool.map(lambda m: vllm_greedy(c, m, PROMPT), models),
                                  strict=True))  # fmt: skip
        log = srv.log.read_text(errors="replace")
    finally:
        srv.stop()
    assert "LoRA linear layers run on lora_kernels" in log  # the kernels served, not a fallback
    assert "not one lora_kernels implements" not in log
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert served[srv.base] == peft_greedy(base, PROMPT)
    peft = PeftModel.from_pretrained(base, dirs["gp-a"], adapter_name="gp-a")
    peft.load_adapter(dirs["gp-b"], adapter_name="gp-b")
    for name in RANKS:
        peft.set_adapter(name)
        assert served[name] == peft_greedy(peft, PROMPT), name
    peft.add_weighted_adapter(["gp-a", "gp-b"], [0.7, -0.3], "cat", combination_type="cat")
    peft.set_adapter("cat")
    assert served[MERGE] == peft_greedy(peft, PROMPT)
    assert len({tuple(v) for v in served.values()}) == len(models)  # each one really differs
