"""Adapter validation: each bad input is refused with its reason; a good adapter passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny_model import TINY, random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, tensor_key
from vllm_lora_ext.adapters.validation import (
    Refused,
    inspect_adapter_dir,
    validate_name,
)

BASE = BaseModelInfo.from_hf_config(
    "tiny",
    {
        "hidden_size": TINY["hidden"],
        "num_attention_heads": TINY["heads"],
        "num_key_value_heads": TINY["kv_heads"],
        "intermediate_size": TINY["inter"],
        "num_hidden_layers": TINY["layers"],
    },
    aliases=["/models/tiny-llama"],
)


def good(tmp_path: Path, **overrides) -> Path:
    return write_adapter(tmp_path / "a", random_lora_tensors(0), base="tiny", **overrides)


def reason(directory: Path, max_rank: int = 16) -> str:
    with pytest.raises(Refused) as e:
        inspect_adapter_dir(directory, BASE, max_rank)
    return e.value.reason


def test_good_adapter_summary(tmp_path: Path) -> None:
    s = inspect_adapter_dir(good(tmp_path), BASE, 16)
    assert s.rank == 8
    assert s.lora_alpha == 16.0
    assert s.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    assert s.declared_base == "tiny"
    assert s.size_bytes > 0


@pytest.mark.parametrize("declared", ["tiny", "/models/tiny-llama", "/elsewhere/tiny-llama", ""])
def test_declared_base_aliases_accepted(tmp_path: Path, declared: str) -> None:
    d = write_adapter(tmp_path / "a", random_lora_tensors(0), base=declared)
    inspect_adapter_dir(d, BASE, 16)


@pytest.mark.parametrize(
    "name", ["a/b", "..", "a..b", "../x", "", "-lead", "x" * 65, "sp ace", "ü", "a\x00"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(Refused) as e:
        validate_name(name)
    assert e.value.reason == "invalid_name"


def test_name_of_base_is_reserved() -> None:
    with pytest.raises(Refused):
        validate_name("tiny", reserved=BASE.aliases)
    assert validate_name("math-v2.1_x") == "math-v2.1_x"


def test_wrong_base(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", random_lora_tensors(0), base="meta-llama/Llama-3-8B")
    assert reason(d) == "wrong_base"


def test_shape_mismatch(tmp_path: Path) -> None:
    t = random_lora_tensors(0)
    t[tensor_key(0, "q_proj", "A")] = torch.randn(8, TINY["hidden"] + 1)
    assert reason(write_adapter(tmp_path / "a", t, base="tiny")) == "shape_mismatch"


def test_layer_beyond_base(tmp_path: Path) -> None:
    t = random_lora_tensors(0, layers=TINY["layers"] + 1)
    assert reason(write_adapter(tmp_path / "a", t, base="tiny")) == "shape_mismatch"


def test_rank_above_max(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", random_lora_tensors(0, rank=32), base="tiny", rank=32)
    assert reason(d, max_rank=16) == "rank_too_high"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(tmp_path: Path, bad: float) -> None:
    t = random_lora_tensors(0)
    t[tensor_key(1, "v_proj", "B")][3, 2] = bad
    assert reason(write_adapter(tmp_path / "a", t, base="tiny")) == "non_finite"


def test_unpaired_factor(tmp_path: Path) -> None:
    t = random_lora_tensors(0)
    del t[tensor_key(0, "o_proj", "B")]
    assert reason(write_adapter(tmp_path / "a", t, base="tiny")) == "malformed_weights"


def test_unsupported_module(tmp_path: Path) -> None:
    t = random_lora_tensors(0)
    t["base_model.model.lm_head.lora_A.weight"] = torch.randn(8, TINY["hidden"])
    assert reason(write_adapter(tmp_path / "a", t, base="tiny")) == "unsupported_module"


def test_pickle_file(tmp_path: Path) -> None:
    d = good(tmp_path)
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")
    assert reason(d) == "pickle_file"


def test_missing_config(tmp_path: Path) -> None:
    d = good(tmp_path)
    (d / CONFIG_FILE).unlink()
    assert reason(d) == "missing_file"


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"peft_type": "LORA", "r": 8}),
        json.dumps({"peft_type": "PREFIX_TUNING", "r": 8, "lora_alpha": 8, "target_modules": []}),
        json.dumps({"peft_type": "LORA", "r": -1, "lora_alpha": 8, "target_modules": ["q_proj"]}),
    ],
)
def test_malformed_config(tmp_path: Path, text: str) -> None:
    d = good(tmp_path)
    (d / CONFIG_FILE).write_text(text)
    assert reason(d) == "malformed_config"


def test_garbage_weights(tmp_path: Path) -> None:
    d = good(tmp_path)
    (d / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    assert reason(d) == "malformed_weights"


def test_integer_weights(tmp_path: Path) -> None:
    t = {k: (v * 100).to(torch.int32) for k, v in random_lora_tensors(0).items()}
    d = tmp_path / "a"
    good(tmp_path)
    save_file(t, str(d / WEIGHTS_FILE))
    assert reason(d) == "malformed_weights"


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_dora": True},
        {"bias": "all"},
        {"bias": "lora_only"},
        {"lora_bias": True},
        {"modules_to_save": ["lm_head"]},
        {"init_lora_weights": "pissa"},
        {"layer_replication": [[0, 1]]},
        {"use_qalora": True},
    ],
)
def test_features_vllm_cannot_serve(tmp_path: Path, overrides: dict) -> None:
    """What vLLM's PEFTHelper refuses is refused here first (a fuzz run found ``bias`` reaching
    the engine, which then answered 422)."""
    assert reason(good(tmp_path, **overrides)) == "malformed_config"


PLAIN = [{"bias": "none"}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": True},
         {"modules_to_save": None}]  # fmt: skip


@pytest.mark.parametrize("overrides", PLAIN)
def test_plain_lora_settings_pass(tmp_path: Path, overrides: dict) -> None:
    inspect_adapter_dir(good(tmp_path, **overrides), BASE, 16)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"r": 17}, "rank_too_high"),  # the fuzz's engine refusal: vLLM checks the config's r
        ({"rank_pattern": {"q_proj": 32}}, "rank_too_high"),
        ({"r": 4}, "malformed_config"),  # vLLM would scale the rank-8 tensors by alpha / 4
        ({"r": "8"}, "malformed_config"),  # vLLM compares the string with 0 and fails
        ({"r": True}, "malformed_config"),
        ({"lora_alpha": "16"}, "malformed_config"),  # vLLM divides the string by r
        ({"lora_alpha": 0}, "malformed_config"),
        ({"use_dora": "0"}, "malformed_config"),  # truthy to vLLM: "does not support DoRA"
        ({"use_rslora": "false"}, "malformed_config"),  # truthy to vLLM: another scaling
        ({"rank_pattern": {"q_proj": "4"}}, "malformed_config"),
        ({"lora_alpha": 1e308}, "non_finite"),  # lora_B x alpha / r overflows at load
    ],
)
def test_config_values_vllm_reads_as_written(tmp_path: Path, overrides: dict, why: str) -> None:
    """vLLM reads adapter_config.json as written: a value pydantic would convert, a rank over
    the server's limit, an r that differs from the tensors, a scaling that overflows lora_B."""
    assert reason(good(tmp_path, **overrides)) == why


def test_a_key_with_a_trailing_newline_is_not_a_lora_factor(tmp_path: Path) -> None:
    tensors = random_lora_tensors(0, targets=("q_proj",), layers=1)
    key = next(iter(tensors))
    tensors[key + "\n"] = tensors.pop(key)
    assert reason(write_adapter(tmp_path / "a", tensors, base="tiny")) == "unsupported_module"


_VLLM_READS = ["r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
               "bias", "lora_bias", "modules_to_save", "init_lora_weights", "target_modules",
               "layer_replication", "use_qalora", "extra"]  # fmt: skip
_LEAVES = (
    st.none() | st.booleans() | st.integers(-2, 40) | st.floats() | st.text(max_size=6)
    | st.from_regex(r"-?[0-9]{1,2}(\.[0-9])?", fullmatch=True)  # numbers as strings
    | st.sampled_from(["0", "false", "no", "off", "none", "gaussian", "pissa"])
)  # fmt: skip
_VALUES = _LEAVES | st.lists(_LEAVES, max_size=2) | st.dictionaries(
    st.sampled_from(["q_proj", "k_proj"]), _LEAVES, max_size=2)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(_VLLM_READS), _VALUES, min_size=1, max_size=2))
@example(changes={"r": "5"})  # the gaps a review found: pydantic converted, vLLM did not
@example(changes={"lora_alpha": "3"})
@example(changes={"use_dora": "0"})
@example(changes={"rank_pattern": {"q_proj": "4"}})
def test_every_config_we_accept_vllm_accepts(changes: dict) -> None:
    """Oracle: vLLM's own PEFTHelper. A config that passes our checks (types, features, the
    declared rank against a max of 16) is one vLLM parses and finds legal at that max."""
    from types import SimpleNamespace

    from pydantic import ValidationError
    from vllm.lora.peft_helper import PEFTHelper

    from vllm_lora_ext.adapters.peft_format import PeftLoraConfig

    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
              "bias": "none", "target_modules": ["q_proj"], "use_rslora": False,
              "use_dora": False, **changes}  # fmt: skip
    try:
        ours = PeftLoraConfig.model_validate(config)
    except ValidationError:
        return
    if ours.unsupported_features() or ours.declared_rank > 16:
        return
    PEFTHelper.from_dict(config).validate_legal(SimpleNamespace(max_lora_rank=16))
