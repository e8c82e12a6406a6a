"""The hardening pieces that need no server: allowed paths, the merged cache's budget, job
records across a restart, the model list, and the CLI's reading of any server answer."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lora_ext.adapters.merged_cache import MergedCache
from vllm_lora_ext.adapters.validation import check_allowed_path
from vllm_lora_ext.cli.client import CliError, Exit, checked, run_command, server_message
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.gateway import is_raw_lora_route, list_registered
from vllm_lora_ext.server.job_records import MAX_RECORDS, JobRecords

# -- allowed paths ----------------------------------------------------------------------------


def test_paths_only_under_allowed_roots_after_resolving_links(tmp_path):
    root, outside = tmp_path / "allowed", tmp_path / "outside"
    (root / "ok").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "ok" / "weights").symlink_to(outside / "secret")
    (outside / "secret").write_bytes(b"x")
    roots = [root.resolve()]
    assert check_allowed_path(root / "ok", roots) == (root / "ok").resolve()
    for bad in (outside, root / "escape", root / "ok" / ".." / ".." / "outside"):
        with pytest.raises(Refused) as e:
            check_allowed_path(bad, roots)
        assert e.value.reason == "path_not_allowed" and e.value.status == 403
    with pytest.raises(Refused) as e:
        check_allowed_path(root / "ok" / "weights", roots, "file")
    assert e.value.reason == "path_not_allowed"
    with pytest.raises(Refused) as e:  # no roots: registration by path is off
        check_allowed_path(root / "ok", [])
    assert e.value.reason == "path_not_allowed" and "upload" in e.value.message
    with pytest.raises(Refused) as e:
        check_allowed_path(root / "missing", roots)
    assert e.value.reason == "missing_file"


# -- the merged cache -------------------------------------------------------------------------


def _entry(cache: MergedCache, key: str, sources: list[str], size: int, stage: Path) -> Path:
    staged = stage / key
    staged.mkdir()
    (staged / "adapter_model.safetensors").write_bytes(b"\0" * size)
    recipe = cache.recipe([(s, 1.0, "0" * 64) for s in sources])
    return cache.commit(staged, key, recipe)


def test_merged_cache_evicts_least_recently_used_over_budget(tmp_path):
    cache = MergedCache(tmp_path, budget_bytes=2900)  # two entries with their recipes
    for i, key in enumerate("abc"):
        _entry(cache, key, ["x", f"only-{key}"], 1000, tmp_path)
        os.utime(cache.path(key), (i, i))
    cache._used.clear()  # as after a restart: the folders' times decide
    assert cache.hit("a") is not None  # a is now the most recently used
    victims = cache.over_budget(keep="c")
    assert [v.key for v in victims] == ["b"]
    for v in victims:
        cache.remove(v)
    assert 2000 < cache.total_bytes() <= 2900
    assert {e.key for e in cache.built_from("only-a")} == {"a"}
    assert {e.key for e in cache.built_from("x")} == {"a", "c"}
    assert not list(cache.root.glob(".trash-*"))


def test_merged_cache_keeps_the_entry_being_served_even_alone_over_budget(tmp_path):
    cache = MergedCache(tmp_path, budget_bytes=10)
    _entry(cache, "big", ["x"], 1000, tmp_path)
    assert cache.over_budget(keep="big") == []


# -- job records ------------------------------------------------------------------------------


def test_job_records_read_running_jobs_as_interrupted(tmp_path):
    live = frozenset({"running", "pending", "rolling_back"})
    records = JobRecords(tmp_path, live)
    records.save("done1", {"id": "done1", "state": "succeeded", "error": None, "result": {"k": 1}})
    records.save("run1", {"id": "run1", "state": "running", "error": None})
    records.save("mig1", {"id": "mig1", "state": "running",
                          "adapters": [{"name": "a", "state": "switched"},
                                       {"name": "b", "state": "running"},
                                       {"name": "c", "state": "pending"}]})  # fmt: skip
    (tmp_path / "broken.json").write_text("{not json")
    again = JobRecords(tmp_path, live).restored
    assert again["done1"] == {
        "id": "done1",
        "state": "succeeded",
        "error": None,
        "result": {"k": 1},
    }
    assert again["run1"]["state"] == "interrupted" and "stopped" in again["run1"]["error"]
    assert [a["state"] for a in again["mig1"]["adapters"]] == [
        "switched",
        "interrupted",
        "interrupted",
    ]
    assert json.loads((tmp_path / "run1.json").read_text())["state"] == "interrupted"


def test_job_records_are_bounded(tmp_path):
    records = JobRecords(tmp_path, frozenset({"running"}))
    for i in range(MAX_RECORDS + 5):
        records.save(f"j{i}", {"id": f"j{i}", "state": "succeeded"})
        os.utime(tmp_path / f"j{i}.json", (i, i))
    assert len(list(tmp_path.glob("*.json"))) == MAX_RECORDS
    assert not (tmp_path / "j0.json").exists()


# -- the gateway's pure parts -----------------------------------------------------------------


def test_raw_lora_routes_are_recognised():
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/",
                 "/adapters/x", "/adapters/../v1/models"):  # fmt: skip
        assert is_raw_lora_route(path), path
    for path in ("/v1/adapters", "/v1/adapters/x", "/v1/models", "/health", "/adaptersx"):
        assert not is_raw_lora_route(path), path


class _Record:
    def __init__(self, name: str) -> None:
        self.name = name


def test_model_list_gets_every_registered_adapter_with_loaded():
    models = {"object": "list", "data": [
        {"id": "base", "parent": None},
        {"id": "a", "parent": "base", "root": "/store/.versions/a-1"},
    ]}  # fmt: skip
    out = list_registered(models, [(_Record("a"), True), (_Record("b"), False)], "base")
    cards = {m["id"]: m for m in out["data"]}
    assert "loaded" not in cards["base"]
    assert cards["a"]["loaded"] is True
    assert cards["b"]["loaded"] is False and cards["b"]["parent"] == "base"
    assert [m["id"] for m in out["data"]] == ["base", "a", "b"]


# -- the CLI's reading of answers -------------------------------------------------------------


def _response(status: int, content: bytes, content_type: str = "application/json"):
    request = httpx.Request("GET", "http://server/v1/adapters")
    return httpx.Response(status, content=content, headers={"content-type": content_type},
                          request=request)  # fmt: skip


@pytest.mark.parametrize(
    ("status", "body", "code", "text"),
    [
        (401, b'{"error": "Unauthorized"}', Exit.UNAUTHORIZED, "Unauthorized"),
        (403, b'{"error": {"message": "disabled", "reason": "r"}}', Exit.UNAUTHORIZED, "disabled"),
        (404, b'{"error": {"message": "adapter x not found"}}', Exit.MISSING, "not found"),
        (409, b'{"detail": "too many files"}', Exit.REFUSED, "too many files"),
        (500, b"Internal Server Error", Exit.SERVER_ERROR, "Internal Server Error"),
        (502, b"<html>bad gateway</html>", Exit.SERVER_ERROR, "bad gateway"),
        (200, b"not json", Exit.SERVER_ERROR, "not JSON"),
    ],
)
def test_every_answer_becomes_one_line_and_a_code(status, body, code, text, capsys):
    def command(_args):
        return checked(_response(status, body))

    assert run_command(command, argparse.Namespace(url="http://server")) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(status=st.integers(100, 599), body=st.binary(max_size=200))
def test_no_answer_raises_anything_but_cli_error(status, body):
    """Whatever a server sends back, reading it gives a value or a CliError."""
    try:
        checked(_response(status, body))
    except CliError as e:
        assert e.code in set(Exit) and e.message
    server_message(_response(status, body))


def test_connection_refused_is_unreachable(capsys):
    def command(args):
        with httpx.Client(base_url=args.url, timeout=2) as c:
            return checked(c.get("/v1/adapters"))

    started = time.monotonic()
    assert run_command(command, argparse.Namespace(url="http://127.0.0.1:9")) == Exit.UNREACHABLE
    assert "cannot reach" in capsys.readouterr().err and time.monotonic() - started < 10


def test_migrations_of_an_earlier_run_are_listed_interrupted(tmp_path):
    from types import SimpleNamespace

    from vllm_lora_ext.server.job_records import JOBS_DIR
    from vllm_lora_ext.server.migrations.forwarding import ForwardTable
    from vllm_lora_ext.server.migrations.jobs import MigrationJobs

    table = ForwardTable()

    def jobs() -> MigrationJobs:
        adapters = SimpleNamespace(store=SimpleNamespace(root=tmp_path), get=lambda name: None)
        return MigrationJobs(adapters, table, tmp_path, lambda _: None, "http://x", "b",
                             api_key="k")  # fmt: skip

    earlier = JobRecords(tmp_path / JOBS_DIR / "migrations", frozenset())
    earlier.save("m1", {"id": "m1", "state": "running", "source_url": "http://old",
                        "request": {"source_url": "http://old"},
                        "adapters": [{"name": "a", "state": "switched"},
                                     {"name": "b", "state": "running"}]})  # fmt: skip
    restarted = jobs()
    (view,) = restarted.views()
    assert view["state"] == "interrupted" and view["request"]["source_url"] == "http://old"
    assert [a["state"] for a in view["adapters"]] == ["switched", "interrupted"]
    assert restarted.view("m1") == view and restarted.rollback("m1") is None
    # Not switched: forwarded to the old server again (with this server's key), not a 404.
    assert table.routes == {"b": "http://old"}
    assert table.auth["http://old"] == {"Authorization": "Bearer k"}


def _gateway_app(service: object) -> tuple[object, list[str]]:
    """vLLM's generation routes behind the gateway: they record the model of what reaches them."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from vllm_lora_ext.server.gateway import GenerationGateway
    from vllm_lora_ext.server.state import LoraExtState, install

    reached: list[str] = []

    async def generate(request):
        reached.append((await request.json())["model"])
        return JSONResponse({"ok": True})

    paths = ("/v1/completions", "/v1/chat/completions")
    app = Starlette(routes=[Route(p, generate, methods=["POST"]) for p in paths])
    app.add_middleware(GenerationGateway)
    install(app.state, LoraExtState(adapters=service))
    return app, reached


def _registered_service(root: Path, inline_merges: bool = True):
    """A real AdapterService (fake engine) holding adapters a, b, c of rank 8 (max rank 16)."""
    from test_adapter_service import FakeEngine, adapter_dir, make_service
    from test_adapter_service import run as run_async

    service = make_service(root / "store", FakeEngine(), inline_merges=inline_merges)
    for seed, name in enumerate("abc"):
        run_async(service.register_from_path(name, adapter_dir(root / name, seed=seed)))
    return service


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_gateway_answers_inline_merges_it_cannot_serve(tmp_path, path):
    """A malformed inline merge is 400 with its reason, an unknown source 404 naming it, both in
    our error shape and before vLLM's handler sees the request; a servable one goes through."""
    from starlette.testclient import TestClient

    from vllm_lora_ext.server import metrics

    app, reached = _gateway_app(_registered_service(tmp_path))
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": []}
    cases = [
        ("merge:a=nan", 400, "non_finite", "'a'"),
        ("merge:a=1,b=-inf", 400, "non_finite", "'b'"),
        ("merge:a=1,a=2", 400, "invalid_merge", "twice"),
        ("merge:a=x", 400, "invalid_merge", "'x'"),
        ("merge:", 400, "invalid_merge", "no adapter"),
        ("merge:a 1", 400, "invalid_merge", "adapter=weight"),
        ("merge:" + ",".join(f"s{i}=1" for i in range(40)), 400, "invalid_merge", "at most"),
        ("merge:a=1,nobody=0.5", 404, "unknown_adapter", "'nobody'"),
        ("merge:a=1,b=1,c=1", 400, "rank_too_high", "rank 24"),
    ]
    with TestClient(app) as client:
        for model, status, reason, text in cases:
            counted = metrics.VALIDATION_FAILURES.labels(reason=reason)
            before = counted._value.get()
            r = client.post(path, json={"model": model, **body})
            assert r.status_code == status, (model, r.text)
            error = r.json()["error"]
            assert (error["reason"], error["code"]) == (reason, status), model
            assert text in error["message"], (model, error)
            assert counted._value.get() == before + 1, model
        for model in ("merge:a=0.7,b=-0.3", "a"):
            assert client.post(path, json={"model": model, **body}).json() == {"ok": True}
    assert reached == ["merge:a=0.7,b=-0.3", "a"]


def test_inline_merges_can_be_turned_off(tmp_path):
    """With ``VLLM_LORA_EXT_INLINE_MERGES=false`` the gateway answers a ``merge:`` model itself
    (400 in our shape) and vLLM's handler never sees it; other models pass through."""
    from starlette.testclient import TestClient

    from vllm_lora_ext.server import metrics

    app, reached = _gateway_app(_registered_service(tmp_path, inline_merges=False))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "merge:a=1", "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "inline_merges_off"
        assert client.post("/v1/completions", json={"model": "a", "prompt": "x"}).json()["ok"]
        refused = metrics.REFUSED_ROUTES.labels(path="/adapters/{name}")
        before = refused._value.get()
        r = client.post("/adapters", json={"name": "x", "src": "/"})
        assert r.status_code == 403 and r.json()["error"]["reason"] == "use_adapters_api"
        assert client.delete("/adapters/some-name").status_code == 403
        assert refused._value.get() == before + 1  # bounded labels: one per route
    assert reached == ["a"]
