"""The serving surface on the suite's keyed server: one door for adapters, the key on every
route that matters, path registration confined, bad merges refused at once."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import httpx
import pytest
from test_adapters_api import complete, snapshot
from test_generation import upload
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture(scope="module")
def nan_adapter(server, tmp_path_factory) -> Path:
    """An adapter with one NaN weight, in a folder the server may read."""
    tensors = random_lora_tensors(41)
    next(iter(tensors.values()))[0, 0] = math.nan
    return write_adapter(tmp_path_factory.mktemp("nan") / "nan", tensors, base=server.base)


def served_models(c: httpx.Client) -> set[str]:
    return {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_vllm_adapter_routes_never_reach_the_engine(server, nan_adapter):
    """vLLM's own load/unload routes (and SageMaker's, outside /v1) are refused with a pointer to
    /v1/adapters, with or without the key; the NaN adapter is never served."""
    attempts = [
        ("POST", "/v1/load_lora_adapter", {"lora_name": "raw1", "lora_path": str(nan_adapter)}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "raw1"}),
        ("POST", "/adapters", {"name": "raw2", "src": str(nan_adapter)}),
        ("DELETE", "/adapters/raw2", None),
    ]
    before = snapshot(server.store)
    with server.client() as keyed, httpx.Client(base_url=server.url, timeout=60) as anonymous:
        for method, path, body in attempts:
            r = keyed.request(method, path, json=body)
            assert r.status_code == 403, (path, r.text)
            error = r.json()["error"]
            assert error["reason"] == "use_adapters_api" and "/v1/adapters" in error["message"]
            r = anonymous.request(method, path, json=body)
            # Without the key: vLLM's 401 on /v1, our 403 outside it; never a load.
            assert r.status_code == (401 if path.startswith("/v1") else 403), (path, r.text)
        assert not {"raw1", "raw2"} & served_models(keyed)
        for name in ("raw1", "raw2"):
            assert complete(keyed, name).status_code == 404
        # Through the one door the same adapter is refused for what it is.
        r = keyed.post("/v1/adapters", json={"name": "raw3", "path": str(nan_adapter)})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "non_finite", r.text
    assert snapshot(server.store) == before


OUR_ROUTES = [
    ("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/v1/adapters/x"),
    ("DELETE", "/v1/adapters/x"), ("POST", "/v1/adapters/x/prefetch"),
    ("POST", "/v1/adapters/x/pin"), ("GET", "/v1/stats"), ("GET", "/v1/stats/x"),
    ("GET", "/v1/stats/x/prompts"), ("POST", "/v1/stats/x/start"), ("POST", "/v1/stats/x/stop"),
    ("GET", "/v1/stats/x/export"), ("POST", "/v1/stats/x/import"), ("DELETE", "/v1/stats/x"),
    ("POST", "/v1/merges"), ("GET", "/v1/merges"), ("GET", "/v1/merges/x"),
    ("DELETE", "/v1/merges/x"), ("POST", "/v1/migrations"), ("GET", "/v1/migrations"),
    ("GET", "/v1/migrations/x"), ("DELETE", "/v1/migrations/x"), ("GET", "/v1/models"),
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
]  # fmt: skip


def test_every_route_wants_the_key(server):
    """Each of our routes and each route that changes adapters: 401 without the key or with a
    wrong one, and the key is accepted (the answer is then anything but 401)."""
    assert server.api_key, "the suite's servers run with --api-key (tests/conftest.py)"
    wrong = {"Authorization": "Bearer not-the-key"}
    with httpx.Client(base_url=server.url, timeout=60) as anonymous, server.client() as keyed:
        for method, path in OUR_ROUTES:
            assert anonymous.request(method, path).status_code == 401, path
            assert anonymous.request(method, path, headers=wrong).status_code == 401, path
            assert keyed.request(method, path).status_code != 401, path


def test_path_registration_is_confined_to_the_allowed_roots(server, tmp_path):
    """The suite's server allows pytest's temporary root only (symlinks resolved first, each
    file too); uploads work from anywhere."""
    good = write_adapter(tmp_path / "good", random_lora_tensors(42), base=server.base)
    with tempfile.TemporaryDirectory(dir=Path.home()) as elsewhere:
        outside = write_adapter(Path(elsewhere) / "a", random_lora_tensors(43), base=server.base)
        (tmp_path / "link").symlink_to(outside)
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        (mixed / CONFIG_FILE).write_bytes((good / CONFIG_FILE).read_bytes())
        (mixed / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
        before = snapshot(server.store)
        with server.client() as c:
            for path in (outside, tmp_path / "link", mixed, Path("/etc")):
                r = c.post("/v1/adapters", json={"name": "confined", "path": str(path)})
                assert r.status_code == 403, (path, r.text)
                assert r.json()["error"]["reason"] == "path_not_allowed"
            assert snapshot(server.store) == before
            assert upload(c, "confined", outside).status_code == 201  # uploads stay available
            r = c.post("/v1/adapters", json={"name": "confined-2", "path": str(good)})
            assert r.status_code == 201, r.text
            for name in ("confined", "confined-2"):
                assert c.delete(f"/v1/adapters/{name}").status_code == 200


def test_non_finite_merges_and_too_many_files_are_refused_in_our_shape(server, tmp_path):
    d = write_adapter(tmp_path / "m", random_lora_tensors(44, rank=4), base=server.base, rank=4)
    with server.client() as c:
        assert upload(c, "sec-m", d).status_code == 201
        for body in (
            {"name": "x", "adapters": [{"name": "sec-m", "weight": math.nan}], "method": "linear"},
            {"name": "x", "adapters": [{"name": "sec-m", "weight": math.inf}], "method": "linear"},
            {"name": "x", "adapters": [{"name": "sec-m"}], "method": "ties",
             "params": {"density": math.nan}},
            {"name": "x", "adapters": [{"name": "sec-m"}], "method": "iteris",
             "params": {"alpha1": -math.inf}},
        ):  # fmt: skip
            # json.dumps writes NaN / Infinity, as many clients do; httpx's json= refuses them.
            r = c.post("/v1/merges", content=json.dumps(body),
                       headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
        r = complete(c, "merge:sec-m=nan")
        assert r.status_code == 400 and r.json()["error"]["reason"] == "non_finite", r.text
        files = [("files", (f"f{i}", b"x")) for i in range(20)]
        r = c.post("/v1/adapters", data={"name": "many"}, files=files)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["reason"] == "too_many_files" and "detail" not in r.json()
        assert c.delete("/v1/adapters/sec-m").status_code == 200
