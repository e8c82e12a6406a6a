"""``/v1/merges`` with ``method: adaptive`` / ``lorahub`` on a real server: the merge from a pool
is served by name exactly as PEFT serves the folded adapter, the job reports its controls, and
each kind of bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_generation import chat, peft_greedy, upload, vllm_greedy
from test_merges import PROMPT, wait
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.store import LINEAGE_FILE

POOL = ["ad-p1", "ad-p2", "ad-p3"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
EXAMPLES = [{"input": f"after {WORDS[i]}?", "output": WORDS[i + 1]} for i in range(9)] + [
    {"input": f"before {WORDS[i + 1]}?", "output": WORDS[i]} for i in range(9)
]


@pytest.fixture(scope="module")
def pool(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    dirs = {
        name: write_adapter(
            root / name, random_lora_tensors(seed, rank=4), base=server.base, rank=4, alpha=8.0
        )
        for name, seed in zip(POOL, (91, 92, 93), strict=True)
    }
    big = write_adapter(
        root / "ad-big", random_lora_tensors(94, rank=16), base=server.base, rank=16
    )
    with server.client() as c:
        for name, d in [*dirs.items(), ("ad-big", big)]:
            assert upload(c, name, d).status_code == 201, name
    yield dirs
    with server.client() as c:
        for name in [*dirs, "ad-big", "ad-merged", "ad-hub", "ad-reservoir"]:
            c.delete(f"/v1/stats/{name}")
            c.delete(f"/v1/adapters/{name}")


def test_adaptive_merge_is_served_by_name_and_equals_peft(server, pool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    body = {
        "name": "ad-merged",
        "adapters": [{"name": n} for n in POOL],
        "method": "adaptive",
        "params": {"k": 2, "steps": 8, "batch": 4, "examples": EXAMPLES},
    }
    with server.client() as c:
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        served = vllm_greedy(c, "ad-merged", PROMPT)
        info = c.get("/v1/adapters/ad-merged").json()
    result = job["result"]
    assert set(result["controls"]) == {"adaptive", "base", "uniform", "random_pool", "fresh_lora"}
    assert isinstance(result["beat_fresh_lora"], bool) and "fresh" in result["verdict"]
    assert len(result["selected"]) == 2 and set(result["selected"]) <= set(POOL)
    assert result["pool"] == POOL and info["rank"] == 8
    recipe = json.loads((server.store / "ad-merged" / "recipe.json").read_text())
    assert recipe["method"] == "adaptive" and recipe["params"]["examples"] == len(EXAMPLES)
    assert [s["name"] for s in recipe["sources"]] == result["selected"]
    base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, server.store / "ad-merged").eval()
    with torch.no_grad():
        assert served == peft_greedy(peft, PROMPT)


def test_lorahub_from_the_whole_pool(server, pool):
    body = {
        "name": "ad-hub",
        "adapters": [{"name": n} for n in POOL],
        "method": "lorahub",
        "params": {"k": 3, "steps": 6, "controls": False, "examples": EXAMPLES},
    }
    with server.client() as c:
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert set(job["result"]["controls"]) == {"lorahub"}
        assert len(vllm_greedy(c, "ad-hub", PROMPT)) > 0


def test_target_examples_from_an_adapters_reservoir(server, pool):
    """Chat traffic captured for ad-p2 becomes the target set, labelled by ad-p2 itself."""
    body = {
        "name": "ad-reservoir",
        "adapters": [{"name": n} for n in POOL],
        "method": "adaptive",
        "params": {"k": 1, "steps": 4, "controls": False, "from_reservoir": POOL[1]},
    }
    with server.client() as c:
        assert c.post(f"/v1/stats/{POOL[1]}/start").status_code == 200
        for e in EXAMPLES[:10]:
            assert chat(c, POOL[1], e["input"], 4).status_code == 200
        assert c.post(f"/v1/stats/{POOL[1]}/stop").status_code == 200
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        examples = job["result"]["examples"]
        assert examples["train"] + examples["heldout"] + examples["too_long"] == 10, examples
        assert len(vllm_greedy(c, "ad-reservoir", PROMPT)) > 0


def test_bad_adaptive_merges_are_refused(server, pool):
    # an adapter of another base in the same (shared) store
    other = server.store / "ad-other-base"
    if not other.exists():
        src = server.store / POOL[0]
        other.mkdir()
        for f in src.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        lineage = json.loads((src / LINEAGE_FILE).read_text())
        (other / LINEAGE_FILE).write_text(json.dumps(lineage | {"name": other.name, "base": "x"}))
    names = [{"name": n} for n in POOL]
    ok = {"k": 2, "examples": EXAMPLES}
    cases = [
        ({"adapters": names, "params": {"k": 2, "examples": EXAMPLES[:5]}}, 400, "at least 8"),
        ({"adapters": [*names, {"name": other.name}], "params": ok}, 400, "wrong_base"),
        ({"adapters": names, "params": {"k": 4, "examples": EXAMPLES}}, 400, "pool holds 3"),
        ({"adapters": "all", "params": {"k": 50, "examples": EXAMPLES}}, 400, "pool holds"),
        ({"adapters": names, "params": {"k": 2}}, 400, "exactly one of"),
        ({"adapters": names, "params": {"from_reservoir": POOL[0]}}, 409, "reservoir"),
        ({"adapters": names, "params": ok | {"selection": "vibes"}}, 400, "selection"),
        ({"adapters": [{"name": "nobody"}], "params": ok}, 404, "not found"),
        ({"adapters": [*names, {"name": "ad-big"}], "params": ok | {"k": 4}}, 400, "rank >= 28"),
    ]
    with server.client() as c:
        for body, status, text in cases:
            r = c.post("/v1/merges", json={"name": "ad-x", "method": "adaptive", **body})
            assert r.status_code == status, (body, r.text)
            assert text in r.text, (text, r.text)
        r = c.post("/v1/merges", json={"name": "ad-x", "adapters": "all", "method": "linear"})
        assert r.status_code == 400 and "adaptive" in r.text
        assert c.get("/v1/adapters/ad-x").status_code == 404
        models = str(c.get("/v1/adapters").json())
    assert "ad-other-base" not in models  # the store lists this base's adapters only
