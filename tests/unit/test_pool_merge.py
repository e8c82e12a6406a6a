"""The pool-merge job on the tiny Llama: the result comes with every control, computed on the
same held-out examples, and a verdict that agrees with the numbers; bad inputs are refused."""

from __future__ import annotations

import json
import math

import pytest
from tiny_model import random_lora_tensors

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge import adaptive as ad
from vllm_lora_ext.merge.pool_merge import (
    AdaptiveParams,
    LorahubParams,
    pool_merge,
    split_rows,
)

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
EXAMPLES = [(f"after {WORDS[i]}?", WORDS[i + 1]) for i in range(9)] + [
    (f"before {WORDS[i + 1]}?", WORDS[i]) for i in range(9)
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models train much faster on one thread beside other jobs (tests/conftest.py)."""


@pytest.fixture(scope="module")
def pool() -> dict[str, LoraWeights]:
    targets = ("q_proj", "v_proj")
    return {
        f"p{s}": LoraWeights(random_lora_tensors(s, rank=4, targets=targets), 4, 8.0)
        for s in (1, 2, 3, 4)
    }


@pytest.mark.parametrize("method", ["adaptive", "lorahub"])
def test_controls_are_computed_beside_the_result(tiny_model_dir, pool, method):
    cls = AdaptiveParams if method == "adaptive" else LorahubParams
    params = cls(k=2, steps=12, batch=4, seed=1)
    phases = []
    result = pool_merge(
        tiny_model_dir, pool, EXAMPLES, method, params, lambda p, d, t: phases.append(p)
    )
    assert len(result.selected) == 2 and set(result.selected) <= set(pool)
    assert result.merged.rank == 8
    assert result.examples == {"train": 14, "heldout": 4, "too_long": 0}
    rows = set(result.controls)
    assert rows == {method, "base", "uniform", "random_pool", "fresh_lora"}
    for name, row in result.controls.items():
        assert all(math.isfinite(v) for v in row.values()), name
    # the base control is the base model's loss on the same held-out rows
    losses = {n: r["heldout_loss"] for n, r in result.controls.items()}
    assert len(set(losses.values())) == 5  # five different models, five different numbers
    assert result.beat_fresh_lora == (losses[method] < losses["fresh_lora"])
    assert ("did NOT beat" in result.verdict) != result.beat_fresh_lora
    assert {"selecting", "fresh lora"} <= set(phases)
    assert result.report()["controls"] == result.controls
    assert set(result.adapters) == rows - {"base"}
    assert result.adapters["fresh_lora"].rank == 8 and result.adapters["uniform"].rank == 8


def test_the_merge_is_scored_as_its_fold_serves(tiny_model_dir, pool):
    params = AdaptiveParams(k=2, steps=5, batch=4, controls=False)
    result = pool_merge(tiny_model_dir, pool, EXAMPLES, "adaptive", params)
    assert set(result.controls) == {"adaptive"}
    from peft import PeftModel
    from transformers import AutoTokenizer

    from vllm_lora_ext.adapters.lora_weights import save_lora
    from vllm_lora_ext.training import distillation_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = distillation_rows(tok, EXAMPLES)
    _, heldout = split_rows(rows, params.heldout_fraction, params.seed)
    out = tiny_model_dir.parent / "pool-merge-fold"
    save_lora(result.merged, out, base=str(tiny_model_dir))
    peft = PeftModel.from_pretrained(ad.load_base(tiny_model_dir), out).eval()
    served = ad.rows_loss(peft, heldout, tok.pad_token_id)
    assert served == pytest.approx(result.controls["adaptive"]["heldout_loss"], rel=1e-4)


def test_bad_inputs_are_refused(tiny_model_dir, pool):
    with pytest.raises(ValueError, match="at least 8"):
        pool_merge(tiny_model_dir, pool, EXAMPLES[:7], "adaptive", AdaptiveParams(k=1))
    with pytest.raises(ValueError, match="pool holds 4"):
        pool_merge(tiny_model_dir, pool, EXAMPLES, "adaptive", AdaptiveParams(k=5))
    with pytest.raises(ValueError, match="at least 8"):  # too long counts as unusable
        pool_merge(tiny_model_dir, pool, EXAMPLES, "lorahub", LorahubParams(k=1, max_len=8))


def test_pool_merge_cli_writes_the_adapter_with_its_controls(tiny_model_dir, pool, tmp_path):
    from tiny_model import write_adapter

    from vllm_lora_ext.adapters.lora_weights import load_lora
    from vllm_lora_ext.cli import main

    dirs = []
    for name, weights in pool.items():
        dirs += ["--pool", str(write_adapter(tmp_path / name, weights.tensors, "tiny", rank=4,
                                             alpha=8.0, targets=("q_proj", "v_proj")))]  # fmt: skip
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in EXAMPLES))
    out = tmp_path / "merged"
    args = ["pool-merge", "--model", str(tiny_model_dir), *dirs, "--examples", str(examples)]
    assert main([*args, "--k", "2", "--steps", "4", "--out", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "adaptive" and len(recipe["sources"]) == 2
    assert set(recipe["controls"]) == {"adaptive", "base", "uniform", "random_pool", "fresh_lora"}
    assert load_lora(out).rank == 8
    assert main([*args, "--k", "2", "--out", str(out)]) == 2  # exists
    assert main([*args, "--k", "9", "--out", str(tmp_path / "x")]) == 2  # k > pool
    assert not (tmp_path / "x").exists()
