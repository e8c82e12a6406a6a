"""A real keyed server restarted on the same store loses nothing that matters, and the inline
merge cache stays within its byte budget while requests keep being served.

Its own server (the suite's keeps running for the other tests): a small merged-cache budget,
two adapters with captured traffic, a finished merge and one left running when it stops.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from test_adapters_api import metric
from test_generation import upload
from test_merges import wait
from test_stats_capture import complete, prompts
from tiny_model import random_lora_tensors, tiny_serve_args, write_adapter

from vllm_lora_ext.adapters.merged_cache import MERGED_DIR
from vllm_lora_ext.server.stats.service import PROMPTS_SUFFIX, STATS_DIR
from vllm_lora_ext.server_process import Server, start_server

ADAPTERS = ("rs-a", "rs-b")


def start(work: Path, model_dir: Path, budget: int) -> Server:
    return start_server(
        work,
        base="tiny-llama",
        serve_args=tiny_serve_args(model_dir),
        env={"VLLM_LORA_EXT_MERGED_CACHE_BYTES": str(budget)},
    )


def merged_bytes(store: Path) -> int:
    root = store / MERGED_DIR
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0


def wait_until(check, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("restart")
    dirs = {
        name: write_adapter(
            work / "src" / name, random_lora_tensors(seed, rank=4), base="tiny-llama", rank=4
        )
        for name, seed in zip(ADAPTERS, (91, 92), strict=True)
    }
    # One merged entry is ~60 kB here; the budget holds three.
    entry = sum(f.stat().st_size for f in dirs["rs-a"].iterdir()) * 2
    srv = start(work, tiny_model_dir, budget=3 * entry)
    yield srv, work, entry
    srv.stop()


def test_inline_merges_stay_within_the_byte_budget(first_run):
    srv, _, entry = first_run
    with srv.client() as c:
        for name in ADAPTERS:
            assert upload(c, name, srv.store.parent / "src" / name).status_code == 201, name
        peak = 0
        for i in range(12):  # distinct merges: each one a new cache entry
            model = f"merge:rs-a={0.5 + i / 100},rs-b=0.5"
            r = c.post("/v1/completions", json={"model": model, "prompt": [5, 6, 7],
                                                "max_tokens": 3, "temperature": 0.0})  # fmt: skip
            assert r.status_code == 200, r.text
            peak = max(peak, merged_bytes(srv.store))
            wait_until(lambda: merged_bytes(srv.store) <= 3 * entry, what="eviction")
        assert peak <= 4 * entry  # at most the newest entry over, until its eviction ran
        entries = [d for d in (srv.store / MERGED_DIR).iterdir() if not d.name.startswith(".")]
        assert 1 <= len(entries) <= 3
        assert metric(c, "vllm_lora_ext_merged_evictions_total") == 12 - len(entries)


def test_restart_keeps_jobs_reservoirs_and_lists_the_store(first_run, tiny_model_dir):
    srv, work, entry = first_run
    with srv.client() as c:
        for i, name in enumerate(ADAPTERS):
            assert c.post(f"/v1/stats/{name}/start").status_code == 200
            for p in prompts(20 + i, 8):
                complete(c, name, p)
            assert c.post(f"/v1/stats/{name}/stop").status_code == 200
        saved = {n: c.get(f"/v1/stats/{n}/prompts").json()["prompts"] for n in ADAPTERS}
        assert all(len(v) == 8 for v in saved.values())
        terms = [{"name": n} for n in ADAPTERS]
        r = c.post("/v1/merges", json={"name": "rs-lin", "adapters": terms, "method": "linear"})
        finished = wait(c, r.json()["id"])
        assert finished["state"] == "succeeded", finished
        long_params = {"iterations": 20, "prompts_per_adapter": 5}
        body = {"name": "rs-long", "adapters": terms, "method": "iteris", "params": long_params}
        r = c.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        long_id = r.json()["id"]
        wait_until(lambda: c.get(f"/v1/merges/{long_id}").json()["phase"] == "replaying",
                   what="the IterIS job replaying")  # fmt: skip
    srv.stop()

    again = start(work, tiny_model_dir, budget=3 * entry)
    try:
        with again.client() as c:
            jobs = {j["id"]: j for j in c.get("/v1/merges").json()["merges"]}
            assert jobs[finished["id"]] == finished  # as it was, result and all
            interrupted = c.get(f"/v1/merges/{long_id}").json()
            assert interrupted["state"] == "interrupted" and interrupted["error"], interrupted
            assert c.delete(f"/v1/merges/{long_id}").json()["state"] == "interrupted"
            assert c.get("/v1/adapters/rs-long").status_code == 404  # nothing half-registered
            for name in ADAPTERS:
                assert c.get(f"/v1/stats/{name}/prompts").json()["prompts"] == saved[name]
            cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
            assert {*ADAPTERS, "rs-lin"} <= set(cards)
            assert not any(cards[n]["loaded"] for n in (*ADAPTERS, "rs-lin"))
            # The reservoirs feed an IterIS replay again.
            r = c.post("/v1/merges", json={"name": "rs-it2", "adapters": terms,
                                           "method": "iteris",
                                           "params": {"iterations": 2,
                                                      "prompts_per_adapter": 2}})  # fmt: skip
            assert r.status_code == 202, r.text
            assert wait(c, r.json()["id"])["state"] == "succeeded"
            cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
            assert cards["rs-it2"]["loaded"] is True
            # Deleting an adapter drops its statistics, prompts and the merges built from it.
            stats = again.store / STATS_DIR
            assert (stats / f"rs-a{PROMPTS_SUFFIX}").is_file()
            r = c.post("/v1/completions", json={"model": "merge:rs-a=1,rs-b=1",
                                                "prompt": [5], "max_tokens": 2})  # fmt: skip
            assert r.status_code == 200
            assert c.delete("/v1/adapters/rs-a").status_code == 200
            assert not (stats / f"rs-a{PROMPTS_SUFFIX}").exists()
            assert not (stats / "rs-a.safetensors").exists()
            assert not any(
                "rs-a" in (d / "recipe.json").read_text()
                for d in (again.store / MERGED_DIR).iterdir()
                if d.is_dir() and not d.name.startswith(".")
            )
            assert (stats / f"rs-b{PROMPTS_SUFFIX}").is_file()
        with httpx.Client(base_url=again.url, timeout=30) as anonymous:
            assert anonymous.get("/v1/merges").status_code == 401
    finally:
        again.stop()
