"""``vllm-lora-ext stats gather`` against a real server: two URLs of one server are two replicas.

``127.0.0.1`` and ``localhost`` reach the same server under different URLs, so a gather over
both must hold exactly twice one capture (float64 ``x + x`` is exact), in a file and once
imported into the server.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import upload
from test_stats_capture import complete, prompts
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.cli import main
from vllm_lora_ext.cli.stats import BAD_INPUT, MISSING, OK, UNREACHABLE
from vllm_lora_ext.server_process import free_port
from vllm_lora_ext.stats.accumulators import IterisStats


@pytest.fixture(scope="module")
def captured(server, tmp_path_factory):
    """Adapter ``sg-a`` with one capture held on the server; ``sg-b`` registered, never captured."""
    root = tmp_path_factory.mktemp("gather")
    names = {"sg-a": 81, "sg-b": 82}
    with server.client() as c:
        for name, seed in names.items():
            d = write_adapter(root / name, random_lora_tensors(seed), base=server.base)
            assert upload(c, name, d).status_code == 201, name
        assert c.post("/v1/stats/sg-a/start", json={"token_budget": 100_000}).status_code == 200
        traffic = prompts(11, 5)
        for p in traffic:
            complete(c, "sg-a", p)
        assert c.post("/v1/stats/sg-a/stop").status_code == 200
        one = IterisStats.from_bytes(c.get("/v1/stats/sg-a/export").content)
    assert one.tokens("sg-a") == sum(map(len, traffic))
    yield one
    with server.client() as c:
        for name in names:
            c.delete(f"/v1/stats/{name}")
            c.delete(f"/v1/adapters/{name}")


def _replicas(server) -> list[str]:
    return [server.url, server.url.replace("127.0.0.1", "localhost")]


def _assert_twice(got: IterisStats, one: IterisStats) -> None:
    assert got.tokens("sg-a") == 2 * one.tokens("sg-a")
    assert got.layers("sg-a") == one.layers("sg-a")
    for key in one.layers("sg-a"):
        assert torch.equal(got.get("sg-a", key).xtx, 2 * one.get("sg-a", key).xtx), key


def test_gather_to_file_sums_both_replicas(server, captured, tmp_path, capsys):
    out = tmp_path / "sums" / "sg-a.safetensors"
    urls = _replicas(server)
    assert (
        main(["stats", "gather", "sg-a", "--url", urls[0], "--url", urls[1], "--out", str(out)])
        == OK
    )
    assert "from 2 replicas" in capsys.readouterr().out
    _assert_twice(IterisStats.load(out), captured)
    assert [p.name for p in out.parent.iterdir()] == ["sg-a.safetensors"]  # no temp file left


def test_gather_into_a_replica_adds_the_others_once(server, captured, capsys):
    urls = _replicas(server)
    # The target (urls[0]) is also a source: it is not fetched, so it holds 1 + 1 captures.
    rc = main(["stats", "gather", "sg-a", "--url", urls[0], "--url", urls[1], "--into", urls[0]])
    assert rc == OK
    assert "from 1 replicas" in capsys.readouterr().out
    with server.client() as c:
        held = IterisStats.from_bytes(c.get("/v1/stats/sg-a/export").content)
        assert c.get("/v1/stats/sg-a").json()["held_tokens"] == 2 * captured.tokens("sg-a")
        # Back to one capture for the other tests of this module.
        assert c.delete("/v1/stats/sg-a").status_code == 200
        assert c.post("/v1/stats/sg-a/import", content=captured.to_bytes()).status_code == 200
    _assert_twice(held, captured)


def test_gather_refusals_have_their_exit_codes(server, captured, tmp_path, capsys):
    url = server.url
    out = str(tmp_path / "x.safetensors")
    # A replica that never captured sg-b: the gather stops, naming it.
    assert main(["stats", "gather", "sg-b", "--url", url, "--out", out]) == MISSING
    assert url in capsys.readouterr().err
    assert main(["stats", "gather", "nobody", "--url", url, "--out", out]) == MISSING
    # --skip-missing sums the others; here there are none, and nothing is written.
    assert main(["stats", "gather", "sg-b", "--url", url, "--out", out, "--skip-missing"]) == OK
    assert "nothing to add" in capsys.readouterr().out
    dead = f"http://127.0.0.1:{free_port()}"
    assert (
        main(["stats", "gather", "sg-a", "--url", url, "--url", dead, "--out", out]) == UNREACHABLE
    )
    assert f"cannot reach {dead}" in capsys.readouterr().err
    assert main(["stats", "gather", "sg-a", "--url", url, "--into", dead]) == UNREACHABLE
    assert main(["stats", "gather", "sg-a", "--url", url, "--url", url + "/", "--out", out]) == (
        BAD_INPUT
    )
    assert not (tmp_path / "x.safetensors").exists()
