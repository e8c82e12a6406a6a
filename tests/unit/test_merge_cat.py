"""The cat merge against PEFT's add_weighted_adapter(combination_type="cat") (merge names:
``test_merge_spec.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.lora_weights import load_lora
from vllm_lora_ext.merge.cat import cat_merge


def delta(w, module: str) -> torch.Tensor:
    a = w.tensors[f"{module}.lora_A.weight"].double()
    b = w.tensors[f"{module}.lora_B.weight"].double()
    return w.scaling * b @ a


def test_cat_equals_peft_cat_and_the_weighted_sum(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a_dir = write_adapter(tmp_path / "a", random_lora_tensors(1), base="tiny", alpha=16)
    b_dir = write_adapter(
        tmp_path / "b", random_lora_tensors(2, rank=4), base="tiny", rank=4, alpha=4
    )
    weights = [0.7, -0.3]
    ours = cat_merge([load_lora(a_dir), load_lora(b_dir)], weights)
    assert ours.rank == 12 and ours.scaling == 1.0

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, a_dir, adapter_name="a")
    peft.load_adapter(b_dir, adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    peft.set_adapter("cat")
    peft.save_pretrained(tmp_path / "peft", selected_adapters=["cat"])
    theirs = load_lora(tmp_path / "peft" / "cat")

    a, b = load_lora(a_dir), load_lora(b_dir)
    assert ours.modules() == theirs.modules() == a.modules()
    for module in ours.modules():
        expected = 0.7 * delta(a, module) - 0.3 * delta(b, module)
        torch.testing.assert_close(delta(ours, module), expected)
        torch.testing.assert_close(delta(theirs, module), expected)


def test_single_adapter_at_weight_one_is_itself(tmp_path: Path) -> None:
    a = load_lora(write_adapter(tmp_path / "a", random_lora_tensors(3), base="tiny", alpha=32))
    merged = cat_merge([a], [1.0])
    for module in a.modules():
        torch.testing.assert_close(delta(merged, module), delta(a, module))


def test_missing_module_contributes_nothing(tmp_path: Path) -> None:
    qv = ("q_proj", "v_proj")
    a = load_lora(write_adapter(tmp_path / "a", random_lora_tensors(4), base="tiny"))
    b = load_lora(
        write_adapter(tmp_path / "b", random_lora_tensors(5, targets=qv), base="tiny", targets=qv)
    )
    merged = cat_merge([a, b], [1.0, 1.0])
    o_proj = next(m for m in merged.modules() if m.endswith("o_proj"))
    torch.testing.assert_close(delta(merged, o_proj), delta(a, o_proj))
