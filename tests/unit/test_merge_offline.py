"""Offline merges of adapter folders: result, recipe, refusals, nothing half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.lora_weights import load_lora
from vllm_lora_ext.adapters.recipe import RECIPE_FILE
from vllm_lora_ext.merge.methods import merge_adapters
from vllm_lora_ext.merge.offline import merge_folders


def two_adapters(tmp: Path, base_b: str = "tiny") -> list[Path]:
    return [
        write_adapter(tmp / "a", random_lora_tensors(1, layers=1), base="tiny"),
        write_adapter(tmp / "b", random_lora_tensors(2, layers=1), base=base_b, alpha=8),
    ]


def test_merge_writes_adapter_and_recipe(tmp_path: Path) -> None:
    paths = two_adapters(tmp_path / "src")
    params = {"density": 0.5, "seed": 9}
    out = merge_folders(paths, [0.6, 0.4], "dare_ties", params, tmp_path / "out", "mix")
    assert out == tmp_path / "out" / "mix"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mix"]  # no staging left
    merged = load_lora(out)
    expected = merge_adapters([load_lora(p) for p in paths], [0.6, 0.4], "dare_ties", params)
    assert merged.rank == expected.rank and merged.scaling == 1.0
    for key, value in expected.tensors.items():
        assert torch.equal(merged.tensors[key], value)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["method"] == "dare_ties" and recipe["rank"] == 8
    assert recipe["params"] == {"density": 0.5, "majority_sign_method": "total", "seed": 9}
    for source, path, weight in zip(recipe["sources"], paths, [0.6, 0.4], strict=True):
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert source == {"path": str(path.resolve()), "weight": weight, "sha256": digest}


def test_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mixed = two_adapters(tmp_path / "mixed", base_b="other-base")
    with pytest.raises(ValueError, match="different base models"):
        merge_folders(mixed, [1, 1], "linear", None, out, "m")
    paths = two_adapters(tmp_path / "src")
    with pytest.raises(ValueError, match="density"):
        merge_folders(paths, [1, 1], "ties", {}, out, "m")
    with pytest.raises(ValueError, match="invalid adapter name"):
        merge_folders(paths, [1, 1], "cat", None, out, "../m")
    with pytest.raises(ValueError, match="one weight per folder"):
        merge_folders(paths, [1], "cat", None, out, "m")
    assert not out.exists()
    merge_folders(paths, [1, 1], "cat", None, out, "m")
    with pytest.raises(ValueError, match="already exists"):
        merge_folders(paths, [1, 1], "svd", None, out, "m")
    assert json.loads((out / "m" / RECIPE_FILE).read_text())["method"] == "cat"
    assert sorted(p.name for p in out.iterdir()) == ["m"]
