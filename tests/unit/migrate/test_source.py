"""Reading the old server's reservoir entries, the migration request's validation and the
forwarding table's drain (pure parts; the HTTP flow is in tests/integration/test_hot_upgrade)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from vllm_lora_ext.migrate.source import SourceError, describe_source, prompt_text
from vllm_lora_ext.server.migrations.forwarding import ForwardTable, list_forwarded
from vllm_lora_ext.server.migrations.job import MigrationRequest


def test_prompt_text_reads_every_reservoir_shape(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": " 12 + 7 "},
                         {"role": "assistant", "content": "19"}]}  # fmt: skip
    assert prompt_text(chat, tok) == "12 + 7"
    content = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    parts = {"messages": [{"role": "user", "content": content}]}
    assert prompt_text(parts, tok) == "a b"
    assert prompt_text({"prompt": "  count the apples "}, tok) == "count the apples"
    ids = tok("three words here", add_special_tokens=False)["input_ids"]
    assert prompt_text({"prompt": ids}, tok) == "three words here"
    assert prompt_text({"messages": [{"role": "system", "content": "x"}]}, tok) is None
    assert prompt_text({"prompt": "   "}, tok) is None


def test_migration_request_is_validated() -> None:
    ok = MigrationRequest.model_validate({"source_url": "http://127.0.0.1:8000"})
    assert ok.options.data == "filtered" and ok.adapters is None
    for bad in (
        {"source_url": "127.0.0.1:8000"},  # no scheme
        {"source_url": "http://a", "adapters": []},
        {"source_url": "http://a", "options": {"student": {"lr": 0}}},
        {"source_url": "http://a", "options": {"stuent": {}}},
        {"source_url": "http://a", "tasks": {"x": {"seeds": [{"input": ""}]}}},
    ):
        with pytest.raises(ValidationError):
            MigrationRequest.model_validate(bad)


def test_unreachable_source_is_a_502() -> None:
    with pytest.raises(SourceError, match="cannot reach") as e:
        describe_source("http://127.0.0.1:9")
    assert e.value.status == 502


def test_drain_waits_for_requests_admitted_before_it_only() -> None:
    table = ForwardTable()
    first = table.admit("a")
    table.admit("b")  # another adapter's request never holds "a" up

    async def main() -> tuple[bool, bool]:
        async def traffic() -> None:  # "a" keeps getting requests, each short
            for _ in range(40):
                ticket = table.admit("a")
                await asyncio.sleep(0.01)
                table.release("a", ticket)

        async def finish_first() -> None:
            await asyncio.sleep(0.2)
            table.release("a", first)

        tasks = [asyncio.create_task(traffic()), asyncio.create_task(finish_first())]
        timed_out = await table.drain("a", timeout=0.05)
        drained = await table.drain("a", timeout=5)
        await asyncio.gather(*tasks)
        return timed_out, drained

    assert asyncio.run(main()) == (False, True)
    assert set(table.in_flight) == {"b"}


def test_model_list_gains_the_forwarded_adapters_it_lacks() -> None:
    served = {"object": "list", "data": [{"id": "base", "object": "model"}, {"id": "math"}]}
    listed = list_forwarded(served, {"math": "http://old", "code": "http://old"})
    assert [m["id"] for m in listed["data"]] == ["base", "math", "code"]
    assert listed["data"][2]["forwarded_to"] == "http://old" and listed["object"] == "list"
    assert "forwarded_to" not in listed["data"][1]  # served here already: left as vLLM says
