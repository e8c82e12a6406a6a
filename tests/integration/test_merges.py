"""``/v1/merges`` end to end on a real server: classic merges equal PEFT's, IterIS equals the
solver fed by PEFT-hook statistics, merged adapters are served by name, bad input is refused."""

from __future__ import annotations

import time

import pytest
import torch
from test_adapters_api import metric
from test_generation import peft_greedy, upload, vllm_greedy
from test_stats_capture import complete, peft_grams, prompts
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.lora_weights import load_lora
from vllm_lora_ext.merge.base_weights import read_base_weights
from vllm_lora_ext.merge.iteris import IterisParams, iteris_merge
from vllm_lora_ext.stats.accumulators import IterisStats

PROMPT = (12, 250, 3, 3, 91, 40)


def wait(client, job_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/merges/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.5)
    raise TimeoutError(job)


@pytest.fixture(scope="module")
def merge_adapters(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("merges")
    # Rank 4 each: two of them (cat: rank 8) fit the tiny server's max rank of 16.
    dirs = {
        name: write_adapter(
            root / name, random_lora_tensors(seed, rank=4), base=server.base, rank=4, alpha=8.0
        )
        for name, seed in (("mg-a", 81), ("mg-b", 82))
    }
    with server.client() as c:
        for name, d in dirs.items():
            assert upload(c, name, d).status_code == 201, name
    yield dirs
    with server.client() as c:
        for name in [*dirs, "mg-ties", "mg-iteris", "mg-big", "mg-cancel"]:
            c.delete(f"/v1/stats/{name}")
            c.delete(f"/v1/adapters/{name}")


def test_ties_merge_is_served_by_name_and_equals_peft(server, merge_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    body = {
        "name": "mg-ties",
        "adapters": [{"name": "mg-a", "weight": 0.6}, {"name": "mg-b", "weight": 0.4}],
        "method": "ties",
        "params": {"density": 0.5},
    }
    done = {"method": "ties", "state": "succeeded"}
    with server.client() as c:
        before = metric(c, "vllm_lora_ext_merge_jobs_total", **done)
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        served = vllm_greedy(c, "mg-ties", PROMPT)
        info = c.get("/v1/adapters/mg-ties").json()
        assert metric(c, "vllm_lora_ext_merge_jobs_total", **done) == before + 1
    assert info["source"].startswith("merge:")
    assert (server.store / "mg-ties" / "recipe.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, merge_adapters["mg-a"], adapter_name="a")
    peft.load_adapter(merge_adapters["mg-b"], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.6, 0.4], "t", combination_type="ties", density=0.5)
    peft.set_adapter("t")
    assert served == peft_greedy(peft, PROMPT)


def test_iteris_from_captured_traffic(server, merge_adapters):
    traffic = {"mg-a": prompts(11, 5), "mg-b": prompts(12, 5)}
    body = {
        "name": "mg-iteris",
        "adapters": [{"name": "mg-a"}, {"name": "mg-b"}],
        "method": "iteris",
        # ~100 tokens per adapter for inputs of width 128/256: XᵀX is singular, the ridge
        # sets the conditioning (1/alpha), hence how far float32 capture noise can travel.
        "params": {"iterations": 1, "alpha1": 1e-3, "alpha2": 1e-3},
    }
    with server.client() as c:
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 409 and "has 0" in r.json()["error"]["message"], r.text
        for name, ps in traffic.items():
            assert c.post(f"/v1/stats/{name}/start").status_code == 200
            for p in ps:
                complete(c, name, p)
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 409 and r.json()["error"]["reason"] == "capturing"
        for name in traffic:
            assert c.post(f"/v1/stats/{name}/stop").status_code == 200
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert len(vllm_greedy(c, "mg-iteris", PROMPT)) > 0

    # Oracle: the solver fed with XᵀX from PEFT forward hooks on the same prompts.
    adapters = [load_lora(merge_adapters[n]) for n in traffic]
    stats = IterisStats()
    for name, ps in traffic.items():
        stats = stats + peft_grams(server.model_dir, merge_adapters[name], ps, name)
    modules = adapters[0].modules()
    want = iteris_merge(
        adapters,
        list(traffic),
        read_base_weights(server.model_dir, modules),
        stats,
        IterisParams(alpha1=1e-3, alpha2=1e-3, manual_weights=(1.0, 1.0)),
    ).weights
    got = load_lora(server.store / "mg-iteris")
    for module in modules:
        g, w = got.delta(module, torch.float64), want.delta(module, torch.float64)
        assert float((g - w).norm() / w.norm()) < 1e-4, module


def test_iteris_iterations_replay_and_report_residual(server, merge_adapters):
    body = {
        "name": "mg-iter2",
        "adapters": [{"name": "mg-a"}, {"name": "mg-b"}],
        "method": "iteris",
        "params": {"iterations": 2, "prompts_per_adapter": 3, "alpha1": 1e-6, "alpha2": 1e-6},
    }
    with server.client() as c:
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        job = wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["iteration"] == 2 and job["residual"] is not None and job["residual"] > 0
        assert "iteris-tmp" not in str(c.get("/v1/models").json())  # the candidate is gone
        assert len(vllm_greedy(c, "mg-iter2", PROMPT)) > 0
        c.delete("/v1/adapters/mg-iter2")


def test_bad_merges_are_refused_and_leave_nothing(server, merge_adapters):
    ok = [{"name": "mg-a"}, {"name": "mg-b"}]
    with server.client() as c:
        unknown = metric(c, "vllm_lora_ext_refusals_total", api="merges", reason="unknown_adapter")
        validation = metric(c, "vllm_lora_ext_validation_failures_total", reason="unknown_adapter")
        cases = [
            ({"name": "x1", "adapters": [{"name": "nobody"}], "method": "linear"}, 404),
            ({"name": "x1", "adapters": ok, "method": "average"}, 400),
            ({"name": "x1", "adapters": ok, "method": "ties", "params": {"density": 2}}, 400),
            ({"name": "x1", "adapters": ok, "method": "linear", "extra": 1}, 400),
            ({"name": "x1", "adapters": [], "method": "linear"}, 400),
            ({"name": "mg-a", "adapters": ok, "method": "linear"}, 409),
            ({"name": "bad name!", "adapters": ok, "method": "linear"}, 400),
            ({"name": "x1", "adapters": ok, "method": "iteris", "params": {"iterations": 0}}, 400),
        ]
        for body, status in cases:
            r = c.post("/v1/merges", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["message"] and r.json()["error"]["reason"]
        # A merge refusal counts as the merges API's refusal, not as an adapter's validation.
        after = metric(c, "vllm_lora_ext_refusals_total", api="merges", reason="unknown_adapter")
        assert after == unknown + 1
        assert metric(c, "vllm_lora_ext_validation_failures_total", reason="unknown_adapter") == (
            validation
        )
        # cat of ranks 4 + 4 with weights fits; svd to rank 32 exceeds the max rank (16).
        r = c.post(
            "/v1/merges",
            json={"name": "mg-big", "adapters": ok, "method": "svd", "params": {"svd_rank": 32}},
        )
        if r.status_code == 202:
            job = wait(c, r.json()["id"])
            assert job["state"] == "failed" and "rank" in job["error"], job
        else:
            assert r.status_code == 400, r.text
        assert c.get("/v1/adapters/mg-big").status_code == 404
        assert c.get("/v1/merges/nope").status_code == 404
        # Cancel an IterIS job with many iterations while it runs.
        r = c.post(
            "/v1/merges",
            json={
                "name": "mg-cancel",
                "adapters": ok,
                "method": "iteris",
                "params": {"iterations": 20, "prompts_per_adapter": 5},
            },
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/v1/merges/{job_id}").json()["phase"] != "replaying":  # mid-run
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert c.delete(f"/v1/merges/{job_id}").status_code == 200
        job = wait(c, job_id)
        assert job["state"] == "cancelled", job
        assert c.get("/v1/adapters/mg-cancel").status_code == 404
        assert "iteris-tmp" not in str(c.get("/v1/models").json())
