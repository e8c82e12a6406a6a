"""The /v1/adapters API on a real server: register, list, use, delete; bad input refused."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_generation import upload
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, tensor_key


def snapshot(store: Path) -> dict[str, str]:
    """Every file under the store (dot-dirs included) with its content hash."""
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{name}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{name} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(
        "/v1/completions",
        json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0},
    )


def test_register_from_path_list_use_delete(server, tmp_path):
    d = write_adapter(tmp_path / "p", random_lora_tensors(5), base=server.base)
    with server.client() as c:
        r = c.post("/v1/adapters", json={"name": "by-path", "path": str(d)})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["rank"] == 8 and info["loaded"] and info["base"] == server.base
        assert info["target_modules"] == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
        )

        listed = {a["name"]: a for a in c.get("/v1/adapters").json()["adapters"]}
        assert listed["by-path"]["size_bytes"] == info["size_bytes"] > 0
        assert "by-path" in {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert c.get("/v1/adapters/by-path").json()["loaded"] is True
        assert complete(c, "by-path").status_code == 200

        assert c.delete("/v1/adapters/by-path").status_code == 200
        assert "by-path" not in {a["name"] for a in c.get("/v1/adapters").json()["adapters"]}
        assert complete(c, "by-path").status_code == 404
        assert c.delete("/v1/adapters/by-path").status_code == 404
        assert c.get("/v1/adapters/by-path").status_code == 404
    assert not (server.store / "by-path").exists()


def test_upload_then_reregister_same_name_after_delete(server, tmp_path):
    first = write_adapter(tmp_path / "1", random_lora_tensors(1), base=server.base)
    second = write_adapter(tmp_path / "2", random_lora_tensors(2), base=server.base)
    with server.client() as c:
        assert upload(c, "reuse", first).status_code == 201
        out1 = complete(c, "reuse").json()["choices"][0]["text"]
        assert c.delete("/v1/adapters/reuse").status_code == 200
        assert upload(c, "reuse", second).status_code == 201
        out2 = complete(c, "reuse").json()["choices"][0]["text"]
        c.delete("/v1/adapters/reuse")
    assert out1 != out2, "the second adapter under a reused name must serve its own weights"


def test_stored_adapter_is_resolved_on_first_request(server, tmp_path):
    """An adapter in the store but not loaded (e.g. after a restart) loads on first use."""
    from vllm_lora_ext.adapters.base_model import BaseModelInfo
    from vllm_lora_ext.adapters.store import AdapterStore

    with server.client() as c:
        listing = c.get("/v1/adapters").json()
        base = BaseModelInfo.from_hf_config(
            server.base, json.loads((server.model_dir / "config.json").read_text())
        )
        store = AdapterStore(server.store)
        with store.staging() as staged:
            write_adapter(staged, random_lora_tensors(9), base=server.base)
            store.commit(staged, "cold", base, listing["max_lora_rank"], source="test")
        assert c.get("/v1/adapters/cold").json()["loaded"] is False
        assert complete(c, "cold").status_code == 200
        assert c.get("/v1/adapters/cold").json()["loaded"] is True
        assert c.delete("/v1/adapters/cold").status_code == 200


def _bad_adapters(root: Path, base: str) -> dict[str, tuple[Path, str, int]]:
    """name -> (directory, expected reason, expected status)."""
    cases: dict[str, tuple[Path, str, int]] = {}

    def case(key: str, reason: str, status: int = 400, **kw) -> Path:
        tensors = kw.pop("tensors", None) or random_lora_tensors(3)
        d = write_adapter(root / key, tensors, base=kw.pop("declared", base), **kw)
        cases[key] = (d, reason, status)
        return d

    (case("no-config", "missing_file") / CONFIG_FILE).unlink()
    (case("bad-config", "malformed_config") / CONFIG_FILE).write_text("{not json")
    torch.save({}, case("pickle", "pickle_file") / "adapter_model.bin")
    t = random_lora_tensors(3)
    t[tensor_key(0, "q_proj", "B")] = torch.randn(64, 8)
    case("shape", "shape_mismatch", tensors=t)
    case("rank", "rank_too_high", tensors=random_lora_tensors(3, rank=32), rank=32)
    t = random_lora_tensors(3)
    t[tensor_key(1, "o_proj", "A")][0, 0] = float("nan")
    case("nan", "non_finite", tensors=t)
    t = random_lora_tensors(3)
    t[tensor_key(0, "v_proj", "B")][1, 1] = float("inf")
    case("inf", "non_finite", tensors=t)
    case("other-base", "wrong_base", declared="Qwen/Qwen2.5-7B")
    (case("garbage", "malformed_weights") / WEIGHTS_FILE).write_bytes(b"garbage!" * 8)
    return cases


@pytest.mark.parametrize("via", ["upload", "path"])
def test_bad_adapters_refused_and_store_unchanged(server, tmp_path, via):
    cases = _bad_adapters(tmp_path, server.base)
    with server.client() as c:
        before = snapshot(server.store)
        for key, (d, reason, status) in cases.items():
            failures = metric(c, "vllm_lora_ext_validation_failures_total", reason=reason)
            if via == "upload":
                r = upload(c, f"bad-{key}", d)
            else:
                r = c.post("/v1/adapters", json={"name": f"bad-{key}", "path": str(d)})
            assert r.status_code == status, (key, r.text)
            err = r.json()["error"]
            assert err["reason"] == reason, (key, err)
            assert err["message"], key
            assert metric(c, "vllm_lora_ext_validation_failures_total", reason=reason) == (
                failures + 1
            ), key
            assert snapshot(server.store) == before, f"{key} left something in the store"
            assert complete(c, f"bad-{key}").status_code == 404


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "sp ace", "semi;colon", "x" * 80])
def test_bad_names_refused(server, tmp_path, name):
    d = write_adapter(tmp_path / "ok", random_lora_tensors(4), base=server.base)
    with server.client() as c:
        before = snapshot(server.store)
        r = upload(c, name, d)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["reason"] == "invalid_name"
        r = c.post("/v1/adapters", json={"name": name, "path": str(d)})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_name"
        assert snapshot(server.store) == before


def test_duplicate_and_base_name_refused(server, tmp_path):
    d = write_adapter(tmp_path / "ok", random_lora_tensors(4), base=server.base)
    with server.client() as c:
        assert upload(c, "dup", d).status_code == 201
        before = snapshot(server.store)
        r = upload(c, "dup", d)
        assert r.status_code == 409 and r.json()["error"]["reason"] == "duplicate_name"
        r = upload(c, server.base, d)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_name"
        assert snapshot(server.store) == before
        assert c.delete("/v1/adapters/dup").status_code == 200


def test_malformed_requests(server, tmp_path):
    d = write_adapter(tmp_path / "ok", random_lora_tensors(4), base=server.base)
    with server.client() as c:
        before = snapshot(server.store)
        assert (
            c.post(
                "/v1/adapters", content=b"{}", headers={"content-type": "text/plain"}
            ).status_code
            == 415
        )
        r = c.post("/v1/adapters", json={"name": "x"})
        assert r.status_code == 400 and "path" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "x", "path": str(d), "extra": 1})
        assert r.status_code == 400
        r = c.post("/v1/adapters", json={"name": "x", "path": str(tmp_path / "missing")})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "missing_file"
        stray = [("files", ("notes.txt", b"hello"))]
        r = c.post("/v1/adapters", data={"name": "x"}, files=stray)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "unexpected_file"
        sneaky = [("files", ("../adapter_config.json", (d / CONFIG_FILE).read_bytes()))]
        r = c.post("/v1/adapters", data={"name": "x"}, files=sneaky)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "unexpected_file"
        assert snapshot(server.store) == before


def test_metrics_move(server, tmp_path):
    d = write_adapter(tmp_path / "m", random_lora_tensors(6), base=server.base)
    with server.client() as c:
        loads = metric(c, "vllm_lora_ext_adapter_loads_total")
        unloads = metric(c, "vllm_lora_ext_adapter_unloads_total")
        registered = metric(c, "vllm_lora_ext_adapters_registered")
        base_requests = metric(c, "vllm_lora_ext_requests_total", adapter="base")

        assert upload(c, "metered", d).status_code == 201
        assert metric(c, "vllm_lora_ext_adapter_loads_total") == loads + 1
        assert metric(c, "vllm_lora_ext_adapters_registered") == registered + 1
        for _ in range(3):
            assert complete(c, "metered").status_code == 200
        assert complete(c, server.base).status_code == 200
        assert metric(c, "vllm_lora_ext_requests_total", adapter="metered") == 3
        assert metric(c, "vllm_lora_ext_requests_total", adapter="base") == base_requests + 1

        assert c.delete("/v1/adapters/metered").status_code == 200
        assert metric(c, "vllm_lora_ext_adapter_unloads_total") == unloads + 1
        assert metric(c, "vllm_lora_ext_adapters_registered") == registered


def _stream(server, model: str, started: threading.Event, out: list) -> None:
    """One streamed completion; records (status, number of text chunks, finish reason)."""
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 48, "temperature": 0.0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with (
        server.client() as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        chunks, finish = 0, None
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            chunks += 1
            finish = choice.get("finish_reason") or finish
            started.set()
        out.append((r.status_code, chunks, finish))


def test_delete_under_traffic_lets_admitted_requests_finish(server, tmp_path):
    """DELETE while streams run on the adapter: they finish, later ones get 404, the engine
    lives on (it died before: vLLM reloaded the removed adapter from its deleted files)."""
    d = write_adapter(tmp_path / "busy", random_lora_tensors(11), base=server.base)
    with server.client() as c:
        assert c.post("/v1/adapters", json={"name": "busy", "path": str(d)}).status_code == 201
        results: list = []
        events = [threading.Event() for _ in range(3)]
        threads = [
            threading.Thread(target=_stream, args=(server, "busy", e, results)) for e in events
        ]
        for t in threads:
            t.start()
        for e in events:
            assert e.wait(60), "a stream did not start"
        assert c.delete("/v1/adapters/busy").status_code == 200
        for t in threads:
            t.join(120)
        assert results == [(200, 48, "length")] * 3
        assert complete(c, "busy").status_code == 404
        assert complete(c, server.base).status_code == 200
        assert c.post("/v1/adapters", json={"name": "busy", "path": str(d)}).status_code == 201
        assert complete(c, "busy").status_code == 200
        assert c.delete("/v1/adapters/busy").status_code == 200


def test_register_and_delete_race_requests_for_the_same_name(server, tmp_path):
    """A request can resolve a just-committed adapter before register loads it, or be
    resolving it while DELETE runs; neither may fail the call or leave it served."""
    d = write_adapter(tmp_path / "racy", random_lora_tensors(12), base=server.base)
    statuses: list[int] = []
    errors: list[BaseException] = []
    halt = threading.Event()

    def hammer() -> None:
        try:
            with server.client() as h:
                while not halt.is_set():
                    statuses.append(complete(h, "racy").status_code)
        except BaseException as e:  # shown by the assertion below, not lost in the thread
            errors.append(e)

    def answered(status: int, since: int) -> None:
        """Until the hammer has got ``status`` for a request answered after ``since`` answers:
        both outcomes are seen in every round, whatever the timing of the two threads."""
        deadline = time.monotonic() + 120
        while status not in statuses[since:]:
            assert thread.is_alive() and not errors, (statuses[since:], errors)
            assert time.monotonic() < deadline, f"no {status} since answer {since}: {statuses}"
            time.sleep(0.02)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        with server.client() as c:
            for _ in range(8):
                r = c.post("/v1/adapters", json={"name": "racy", "path": str(d)})
                assert r.status_code == 201, r.text
                answered(200, len(statuses))
                assert c.delete("/v1/adapters/racy").status_code == 200
                assert "racy" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
                answered(404, len(statuses))
    finally:
        halt.set()
        # Longer than the unload's drain (120 s): a request aborted by it would answer first.
        thread.join(150)
    assert not thread.is_alive(), f"a request for 'racy' hung; answers so far: {statuses}"
    assert not errors, errors
    assert set(statuses) <= {200, 404} and 200 in statuses and 404 in statuses
