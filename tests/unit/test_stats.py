"""Capture accumulators, prompt reservoir and the statistics export format (pure torch)."""

from __future__ import annotations

import pytest
import torch

from vllm_lora_ext.stats.accumulators import FORMAT, InputStats, IterisStats, input_key
from vllm_lora_ext.stats.capture import (
    CaptureBudgetError,
    CaptureRequest,
    TrafficCapture,
    wants_layer,
)
from vllm_lora_ext.stats.reservoir import Reservoir, prompt_of_body

LAYERS = {"m.layers.0.self_attn.qkv_proj": 8, "m.layers.0.mlp.down_proj": 16}


def test_layer_keys_share_fused_inputs() -> None:
    assert input_key("base_model.model.model.layers.3.self_attn.v_proj") == (
        "model.layers.3.self_attn.qkv_proj"
    )
    assert input_key("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_up_proj"
    assert input_key("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"
    assert wants_layer("x.qkv_proj", ["v_proj"]) and not wants_layer("x.qkv_proj", ["o_proj"])


def test_observe_attributes_rows_by_slot_and_respects_budget() -> None:
    capture = TrafficCapture(LAYERS, memory_budget_bytes=1 << 20)
    capture.start(CaptureRequest(lora_id=7, targets=("q_proj",), token_budget=5))
    x = torch.randn(6, 8)
    slots = torch.tensor([0, 1, -1, 1, 1, 0, 1])  # longer than x: vLLM's buffer is padded
    slot_to_id = [3, 7]
    capture.observe("m.layers.0.self_attn.qkv_proj", x, slots, slot_to_id)
    capture.observe("m.layers.0.mlp.down_proj", torch.randn(6, 16), slots, slot_to_id)
    mine = x[torch.tensor([1, 3, 4])].double()
    c = capture.captures[7]
    torch.testing.assert_close(c.sums["m.layers.0.self_attn.qkv_proj"], mine.T @ mine)
    assert "m.layers.0.mlp.down_proj" not in c.sums  # not a target of this adapter
    capture.observe("m.layers.0.self_attn.qkv_proj", x, slots, slot_to_id)
    assert c.captured_tokens == 5 and c.seen_tokens == 6  # budget caps at 5 of 6 seen


def test_sampling_keeps_the_same_rows_in_every_layer() -> None:
    capture = TrafficCapture({"a.qkv_proj": 4, "b.qkv_proj": 4}, memory_budget_bytes=1 << 20)
    capture.start(CaptureRequest(1, ("q_proj",), token_budget=10_000, sample_rate=0.3, seed=5))
    x = torch.randn(200, 4)
    slots = torch.zeros(200, dtype=torch.long)
    for layer in ("a.qkv_proj", "b.qkv_proj"):
        capture.observe(layer, x, slots, [1])
    c = capture.captures[1]
    torch.testing.assert_close(c.sums["a.qkv_proj"], c.sums["b.qkv_proj"])
    assert 30 < c.tokens["a.qkv_proj"] < 90  # ~60 of 200


def test_memory_budget_is_enforced() -> None:
    capture = TrafficCapture(LAYERS, memory_budget_bytes=8 * (8 * 8 + 16 * 16))
    capture.start(CaptureRequest(1, ("q_proj", "down_proj"), token_budget=10))
    with pytest.raises(CaptureBudgetError, match="budget"):
        capture.start(CaptureRequest(2, ("q_proj",), token_budget=10))
    with pytest.raises(CaptureBudgetError, match="no LoRA layer"):
        capture.start(CaptureRequest(3, ("lm_head",), token_budget=10))
    capture.stop(1)
    capture.start(CaptureRequest(2, ("q_proj",), token_budget=10))


def test_exports_round_trip_and_foreign_or_future_ones_are_refused() -> None:
    from safetensors.torch import save

    x = torch.randn(5, 3).double()
    stats = IterisStats({("a", "l"): InputStats(x.T @ x, 5)})
    back = IterisStats.from_bytes(stats.to_bytes())
    torch.testing.assert_close(back.get("a", "l").xtx, x.T @ x)
    assert back.tokens("a") == 5 and back.layers("a") == ["l"]
    with pytest.raises(ValueError, match="not a"):
        IterisStats.from_bytes(save({"l": torch.eye(2)}))
    future = save(
        {"0.xtx": torch.eye(2)},
        metadata={"format": FORMAT, "version": "99", "index": '[["a", "l", 1, 0]]'},
    )
    with pytest.raises(ValueError, match="version"):
        IterisStats.from_bytes(future)
    with pytest.raises(ValueError, match="unreadable"):
        IterisStats.from_bytes(b"junk")


def test_reservoir_is_bounded_and_uniform() -> None:
    hits = [0] * 100
    for seed in range(300):
        r = Reservoir(10, seed)
        for i in range(100):
            r.offer({"prompt": [i]})
        assert len(r.items) == 10 and r.seen == 100
        for item in r.items:
            hits[item["prompt"][0]] += 1
    # Each of 100 prompts kept with p = 0.1: ~30 of 300 runs; early ones not favoured.
    assert sum(hits[:50]) == pytest.approx(sum(hits[50:]), rel=0.2)
    assert max(hits) < 60


def test_prompt_of_body_reads_completions_and_chat() -> None:
    assert prompt_of_body({"prompt": "hi"}) == [{"prompt": "hi"}]
    assert prompt_of_body({"prompt": ["a", "b"]}) == [{"prompt": "a"}, {"prompt": "b"}]
    assert prompt_of_body({"prompt": [1, 2]}) == [{"prompt": [1, 2]}]
    msgs = [{"role": "user", "content": "x"}]
    assert prompt_of_body({"messages": msgs}) == [{"messages": msgs}]
    assert prompt_of_body({"prompt": ""}) == [] and prompt_of_body({}) == []


def test_summary_reads_the_header_only_and_agrees_with_a_full_load(tmp_path) -> None:
    x = torch.randn(7, 3).double()
    stats = IterisStats(
        {
            ("a", "l1"): InputStats(x.T @ x, 7),
            ("a", "l2"): InputStats(x.T @ x, 7, x.T @ x, x.T @ x, 7),
        }
    )
    path = tmp_path / "a.safetensors"
    stats.save(path)
    summary = IterisStats.summary(path)
    loaded = IterisStats.load(path)
    assert summary.tokens == {"a": loaded.tokens("a")} == {"a": 7}
    assert summary.layers == {"a": len(loaded.layers("a"))} == {"a": 2}
    assert summary.nbytes == loaded.nbytes == 4 * 9 * 8
