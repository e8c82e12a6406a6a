"""Two real servers on one adapter store, as replicas on a shared volume (deploy/k8s).

What one replica registers, the other serves; what one deletes or replaces, the other stops
serving or serves anew, even though vLLM on the other replica already held the old weights.
"""

from __future__ import annotations

import pytest
from test_generation import upload
from tiny_model import random_lora_tensors, tiny_serve_args, write_adapter

# Long enough to fill whole KV blocks: vLLM's prefix cache keeps those, keyed by adapter name
# and path, so an adapter replaced under the same name must not get the old weights' blocks.
PROMPT = [3 + (i * 37) % 370 for i in range(300)]


@pytest.fixture(scope="module")
def replica(server, tmp_path_factory):
    """A second server whose store is the session server's store."""
    from vllm_lora_ext.server_process import start_server

    work = tmp_path_factory.mktemp("replica")
    args = [*tiny_serve_args(server.model_dir), "--store", str(server.store)]  # last one wins
    srv = start_server(work, base=server.base, serve_args=args)
    yield srv
    srv.stop()


def greedy(client, model: str) -> list[int] | int:
    """The greedy continuation's token ids, or the status code when refused."""
    r = client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 12,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    return r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.status_code


def test_a_name_registered_again_serves_its_new_weights(server, tmp_path):
    one = write_adapter(tmp_path / "1", random_lora_tensors(93), base=server.base)
    two = write_adapter(tmp_path / "2", random_lora_tensors(94), base=server.base)
    with server.client() as a:
        assert upload(a, "again", one).status_code == 201
        first = greedy(a, "again")
        assert a.delete("/v1/adapters/again").status_code == 200
        assert upload(a, "again", two).status_code == 201
        second = greedy(a, "again")
        assert a.delete("/v1/adapters/again").status_code == 200
        assert upload(a, "again-ref", two).status_code == 201
        reference = greedy(a, "again-ref")  # the new weights under a fresh name
        assert a.delete("/v1/adapters/again-ref").status_code == 200
    assert second == reference != first


def test_replicas_follow_each_other_through_the_store(server, replica, tmp_path):
    one = write_adapter(tmp_path / "1", random_lora_tensors(91), base=server.base)
    two = write_adapter(tmp_path / "2", random_lora_tensors(92), base=server.base)
    with server.client() as a, replica.client() as b:
        assert upload(a, "shared", one).status_code == 201
        first = greedy(a, "shared")
        assert greedy(b, "shared") == first  # resolved from the store on B
        assert "shared" in {x["name"] for x in b.get("/v1/adapters").json()["adapters"]}

        # Replaced on A while B holds the old weights: B serves the new ones.
        assert a.delete("/v1/adapters/shared").status_code == 200
        assert upload(a, "shared", two).status_code == 201
        second = greedy(a, "shared")
        assert second != first
        assert greedy(b, "shared") == second

        # Pinned on B, then replaced on A: B serves the new weights and keeps the pin.
        assert b.post("/v1/adapters/shared/pin").status_code == 200
        assert a.delete("/v1/adapters/shared").status_code == 200
        assert upload(a, "shared", one).status_code == 201
        assert greedy(b, "shared") == first
        listed = {x["name"]: x for x in b.get("/v1/adapters").json()["adapters"]}
        assert listed["shared"]["pinned"] and listed["shared"]["cached"]

        # Deleted on A: B stops serving it.
        assert a.delete("/v1/adapters/shared").status_code == 200
        assert greedy(b, "shared") == 404
        assert "shared" not in {m["id"] for m in b.get("/v1/models").json()["data"]}
