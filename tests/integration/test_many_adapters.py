"""256 adapters on one real server with 8 CPU-cache places: lazy loads, LRU eviction, pins.

The adapters (ranks 4/8/16, five different sets of target modules) are written into the store
through the store API before the server starts, as a shared volume would hold them; the server
has never seen them and loads each on its first request through the store's ``LoRAResolver``.
Every adapter is requested twice, in random order, 8 requests in flight (so batches mix up to
``--max-loras`` adapters and the 8-place CPU cache evicts all the time), and every answer is
compared token for token with PEFT + transformers on that adapter.
"""

from __future__ import annotations

import copy
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny_model import random_lora_tensors, tiny_serve_args, write_adapter

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.store import AdapterStore

N_ADAPTERS = 256
NEW_TOKENS = 8
RANKS = (4, 8, 16)
TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
PINNED = ("many-000", "many-001")
MAX_LORAS, MAX_CPU_LORAS = 4, 8  # from tiny_serve_args


def name_of(i: int) -> str:
    return f"many-{i:03d}"


def prompt_of(i: int) -> list[int]:
    rng = random.Random(1000 + i)
    return [rng.randrange(3, 300) for _ in range(rng.randrange(4, 12))]


def spec_of(i: int) -> tuple[int, tuple[str, ...]]:
    return RANKS[i % len(RANKS)], TARGET_SETS[i % len(TARGET_SETS)]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    dirs = {}
    for i in range(N_ADAPTERS):
        rank, targets = spec_of(i)
        tensors = random_lora_tensors(5000 + i, rank=rank, targets=targets)
        dirs[name_of(i)] = write_adapter(
            root / name_of(i), tensors, base="tiny-llama", rank=rank, targets=targets
        )
    return dirs


@pytest.fixture(scope="module")
def many_server(tiny_model_dir, adapter_dirs, tmp_path_factory):
    """A server of its own: its store is filled before it starts, and two adapters are pinned."""
    from vllm_lora_ext.server_process import start_server

    work = tmp_path_factory.mktemp("many-server")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    base = BaseModelInfo.from_hf_config("tiny-llama", config, aliases=[str(tiny_model_dir)])
    store = AdapterStore(work / "store")
    for name, directory in adapter_dirs.items():
        with store.staging() as staged:
            for f in directory.iterdir():
                (staged / f.name).write_bytes(f.read_bytes())
            store.commit(staged, name, base, max_rank=16, source=str(directory))
    srv = start_server(
        work,
        base="tiny-llama",
        serve_args=tiny_serve_args(tiny_model_dir),
        env={"VLLM_LORA_EXT_PINNED_ADAPTERS": ",".join(PINNED)},
    )
    yield srv
    srv.stop()


def vllm_greedy(client, model: str, prompt: list[int]) -> list[int]:
    r = client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, f"{model}: {r.text}"
    return r.json()["choices"][0]["token_ids"]


@torch.no_grad()
def peft_greedy(base, adapter_dir: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    """PEFT's tokens and, per step, the gap between the best and second-best logit."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    ids = torch.tensor([prompt])
    margins = []
    for _ in range(NEW_TOKENS):
        top = model(input_ids=ids).logits[0, -1].topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist(), margins


def listed(client) -> dict[str, dict]:
    return {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}


def test_256_adapters_in_random_order_match_peft(many_server, adapter_dirs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with many_server.client() as c:
        before = listed(c)
        assert len(before) == N_ADAPTERS
        # Pinned at start (loaded, cached, pinned); the others wait for their first request.
        assert all(before[n]["pinned"] and before[n]["cached"] for n in PINNED)
        assert sum(a["loaded"] for a in before.values()) == len(PINNED)

        jobs = [name_of(i) for i in range(N_ADAPTERS)] * 2
        random.Random(7).shuffle(jobs)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: vllm_greedy(c, n, prompt_of(int(n[-3:]))), jobs))
        after = listed(c)

    assert all(a["loaded"] for a in after.values())  # every one resolved from the store
    cached = {n for n, a in after.items() if a["cached"]}
    assert set(PINNED) <= cached, "pinned adapters were evicted"
    assert len(cached) <= MAX_CPU_LORAS  # the LRU evicted the other ~250

    served: dict[str, list[int]] = {}
    for name, tokens in zip(jobs, answers, strict=True):
        assert served.setdefault(name, tokens) == tokens, f"{name}: two requests, two answers"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: 25x faster than 2 threads
    try:
        for name, tokens in sorted(served.items()):
            want, margins = peft_greedy(base, adapter_dirs[name], prompt_of(int(name[-3:])))
            for step, (got_token, want_token) in enumerate(zip(tokens, want, strict=True)):
                if got_token != want_token:
                    # Only a near-tie of PEFT's own logits may flip a greedy choice in float32.
                    assert margins[step] < 1e-4, (name, step, tokens, want, margins[step])
                    break
    finally:
        torch.set_num_threads(threads)


def scrape(client) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_first_loads_went_ahead_and_service_levels_are_per_adapter(many_server):
    """After the 512 requests above (run first): each was timed under a bounded set of adapter
    labels, and each of the 254 first loads through the store resolver was read in the
    background before vLLM's add_lora (which then did not read the files)."""
    with many_server.client() as c:
        metrics = scrape(c)
    ttft = [
        s
        for s in metrics["vllm_lora_ext_adapter_time_to_first_token_seconds"]
        if s.name.endswith("_count")
    ]
    labels = {s.labels["adapter"] for s in ttft}
    assert sum(s.value for s in ttft) == 2 * N_ADAPTERS
    assert "other" in labels and len(labels - {"other", "base"}) == 20  # the default top 20
    tpot = metrics["vllm_lora_ext_adapter_time_per_output_token_seconds"]
    assert sum(s.value for s in tpot if s.name.endswith("_count")) == 2 * N_ADAPTERS
    loads = {
        s.labels["path"]: s.value
        for s in metrics["vllm_lora_ext_adapter_load_seconds"]
        if s.name.endswith("_count")
    }
    assert loads["ahead"] >= N_ADAPTERS - len(PINNED), loads
    resident = {s.labels["where"]: s.value for s in metrics["vllm_lora_ext_adapters_resident"]}
    assert sum(resident.values()) == N_ADAPTERS and resident["disk"] >= N_ADAPTERS - MAX_CPU_LORAS


def test_prefetch_and_pin_routes(many_server):
    with many_server.client() as c:
        cold = next(n for n, a in listed(c).items() if not a["cached"])
        r = c.post(f"/v1/adapters/{cold}/prefetch")
        assert r.status_code == 200, r.text
        assert r.json()["cached"] is True and r.json()["pinned"] is False
        assert listed(c)[cold]["cached"] is True  # loaded without a generation request

        # Room for MAX_CPU_LORAS - MAX_LORAS pins: two are taken at start.
        extra = [n for n, a in listed(c).items() if not a["pinned"]][:3]
        for name in extra[:2]:
            r = c.post(f"/v1/adapters/{name}/pin")
            assert r.status_code == 200 and r.json()["pinned"] is True, r.text
        r = c.post(f"/v1/adapters/{extra[2]}/pin")
        assert r.status_code == 409 and r.json()["error"]["reason"] == "too_many_pinned"

        # Traffic through 12 other adapters (more than the CPU cache holds) keeps the pins.
        others = [n for n in sorted(listed(c)) if n not in {*PINNED, *extra}][:12]
        for name in others:
            vllm_greedy(c, name, prompt_of(int(name[-3:])))
        now = listed(c)
        assert all(now[n]["cached"] for n in (*PINNED, *extra[:2]))
        assert not now[others[0]]["cached"]  # least recently used, unpinned: evicted

        assert c.post("/v1/adapters/nobody/prefetch").status_code == 404
        assert c.post("/v1/adapters/nobody/pin").status_code == 404
