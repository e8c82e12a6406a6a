"""Hostile input against the real server: randomly corrupted uploads and inline-merge names.

Whatever arrives, the answer is a 2xx or a 4xx in our error shape, never a 5xx; the server stays
healthy; and the store holds exactly what it held (an upload that happens to be a valid adapter,
say a bit flip inside a weight, is accepted, then deleted by the test).
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_adapters_api import snapshot
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.peft_format import ALLOWED_FILES, CONFIG_FILE, WEIGHTS_FILE

UPLOAD_CASES = 1000
MERGE_CASES = 300
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def valid(server, tmp_path_factory) -> dict[str, bytes]:
    """The smallest valid adapter (rank 1, q_proj of one layer): the fuzz's starting point."""
    d = write_adapter(
        tmp_path_factory.mktemp("fuzz") / "a",
        random_lora_tensors(61, rank=1, targets=("q_proj",), layers=1),
        base=server.base,
        rank=1,
        targets=("q_proj",),
    )
    return {
        CONFIG_FILE: (d / CONFIG_FILE).read_bytes(),
        WEIGHTS_FILE: (d / WEIGHTS_FILE).read_bytes(),
    }


@pytest.fixture(scope="module")
def fuzz_client(server, valid):
    with server.client(timeout=60) as c:
        before = _store(server)
        yield c
        assert c.get("/health").status_code == 200
    assert _store(server) == before


def _store(server) -> dict[str, str]:
    """The adapters' files (the inline-merge cache is bounded and exercised elsewhere)."""
    return {k: v for k, v in snapshot(server.store).items() if not k.startswith(".merged")}


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )


@st.composite
def corrupted_files(draw, valid: dict[str, bytes]) -> list[tuple[str, bytes]]:
    weights, config = valid[WEIGHTS_FILE], json.loads(valid[CONFIG_FILE])
    header = 8 + int.from_bytes(weights[:8], "little")
    kind = draw(st.sampled_from(["truncate", "flip", "flip_header", "config", "files", "none"]))
    if kind == "truncate":
        weights = weights[: draw(st.integers(0, len(weights) - 1))]
    elif kind in ("flip", "flip_header"):
        data = bytearray(weights)
        end = header if kind == "flip_header" else len(data)
        for pos in draw(st.lists(st.integers(0, end - 1), min_size=1, max_size=4)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        weights = bytes(data)
    config_bytes = valid[CONFIG_FILE]
    if kind == "config":
        key = draw(st.sampled_from([*config, "extra"]))
        if draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = draw(_json_values())
        config_bytes = json.dumps(config).encode()
    files = [(CONFIG_FILE, config_bytes), (WEIGHTS_FILE, weights)]
    if kind == "files":
        names = st.sampled_from(sorted(ALLOWED_FILES)) | st.text(max_size=30)
        extra = draw(st.lists(st.tuples(names, st.binary(max_size=64)), max_size=3))
        files = draw(st.permutations([*files, *extra]))[: draw(st.integers(0, len(files) + 3))]
    return files


def _names():
    return st.from_regex(r"fz-[a-z0-9]{1,6}", fullmatch=True) | st.text(max_size=70)


def test_corrupted_uploads_never_break_the_server(server, valid, fuzz_client):
    cases: list[str] = []
    engine_refusals: list[str] = []  # what the engine said, and to which files: to fix it

    @settings(FUZZ, max_examples=UPLOAD_CASES)
    @given(name=_names(), files=corrupted_files(valid))
    def upload(name, files):
        multipart = [("files", (n, data)) for n, data in files]
        try:
            r = fuzz_client.post("/v1/adapters", data={"name": name}, files=multipart)
        except (UnicodeEncodeError, ValueError):  # the client cannot even encode the name
            cases.append("not sendable")
            return
        assert r.status_code < 500, r.text
        if r.status_code == 201:
            cases.append("accepted")
            assert fuzz_client.delete(f"/v1/adapters/{r.json()['name']}").status_code == 200
        else:
            error = r.json()["error"]
            assert error["message"] and error["code"] == r.status_code, r.text
            cases.append(error["reason"])
            if error["reason"] == "engine_rejected":
                shown = [(n, len(data), data[:200]) for n, data in files]
                engine_refusals.append(f"{error['message']} <- {name!r} {shown!r}")

    upload()
    outcomes = Counter(cases)
    print(f"{len(cases)} uploads: {dict(outcomes.most_common())}")
    assert len(cases) >= UPLOAD_CASES
    # The corruptions reach every layer of validation, some valid uploads get through, every
    # refusal names its reason, and none reaches vLLM only to be refused there.
    assert outcomes["accepted"] > 0 and len(outcomes) >= 6, outcomes
    assert None not in outcomes, outcomes
    assert not engine_refusals, "\n".join(engine_refusals)


def test_random_inline_merge_names_never_break_the_server(server, valid, fuzz_client):
    files = [("files", (n, data)) for n, data in valid.items()]
    assert fuzz_client.post("/v1/adapters", data={"name": "fz-m"}, files=files).status_code == 201
    weights = st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.text(max_size=6)
    terms = st.lists(
        st.tuples(st.sampled_from(["fz-m", "fz-none", server.base]) | st.text(max_size=8), weights),
        min_size=0, max_size=3,
    )  # fmt: skip
    cases = []

    @settings(FUZZ, max_examples=MERGE_CASES)
    @given(terms=terms, raw=st.text(max_size=40), structured=st.booleans())
    def request(terms, raw, structured):
        cases.append(1)
        tail = ",".join(f"{n}={w}" for n, w in terms) if structured else raw
        body = {"model": f"merge:{tail}", "prompt": [5, 6], "max_tokens": 1}
        r = fuzz_client.post("/v1/completions", json=body)
        assert r.status_code < 500, r.text

    try:
        request()
    finally:
        assert fuzz_client.delete("/v1/adapters/fz-m").status_code == 200
    assert len(cases) >= MERGE_CASES
    assert fuzz_client.get("/health").status_code == 200


def test_the_server_is_healthy_after_the_fuzz(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
