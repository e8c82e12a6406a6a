"""Every classic merge against PEFT's add_weighted_adapter, plus invariants and validation.

Adapters: ``a`` (rank 8, all targets), ``b`` (rank 8, rsLoRA, q/v only: modules missing) and
``c`` (rank 4). PEFT refuses mixed ranks for the factor-wise methods, so those use ``a`` and ``b``;
the dense (svd) methods and cat use all three. Factor-wise results are compared factor by factor;
dense ones by ΔW = B A (SVD signs are arbitrary), except with clamping, where the factors
themselves must match.
"""

from __future__ import annotations

import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge import task_tensors as tt
from vllm_lora_ext.merge.methods import MERGE_METHODS, merge_adapters, validate_params
from vllm_lora_ext.merge.params import DareParams, SvdParams, TiesParams

QV = ("q_proj", "v_proj")
F32 = {"rtol": 1e-5, "atol": 1e-5}  # float32 factors compared as float64 products
_names = itertools.count()


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("adapters")
    a = write_adapter(tmp / "a", random_lora_tensors(11), base="tiny", alpha=16)
    b = write_adapter(
        tmp / "b", random_lora_tensors(12, targets=QV), base="tiny", alpha=8, targets=QV,
        use_rslora=True,
    )  # fmt: skip
    c = write_adapter(tmp / "c", random_lora_tensors(13, rank=4), base="tiny", rank=4, alpha=4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.load_adapter(c, adapter_name="c")
    return model


def from_peft(model, name: str) -> LoraWeights:
    """An adapter of the PEFT model as LoraWeights, modules in the model's order."""
    from peft.tuners.lora import LoraLayer

    tensors = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            tensors[f"base_model.model.{path}.lora_A.weight"] = module.lora_A[name].weight.detach()
            tensors[f"base_model.model.{path}.lora_B.weight"] = module.lora_B[name].weight.detach()
    cfg = model.peft_config[name]
    return LoraWeights(tensors, rank=cfg.r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora)


def peft_merge(model, names: list[str], weights: list[float], method: str, **kw) -> LoraWeights:
    new = f"merged{next(_names)}"
    model.add_weighted_adapter(names, weights, new, combination_type=method, **kw)
    return from_peft(model, new)


def delta(w: LoraWeights, module: str) -> torch.Tensor:
    a = w.tensors[f"{module}.lora_A.weight"].double()
    return w.scaling * w.tensors[f"{module}.lora_B.weight"].double() @ a


def assert_same_factors(ours: LoraWeights, theirs: LoraWeights) -> None:
    assert ours.rank == theirs.rank and sorted(ours.tensors) == sorted(theirs.tensors)
    for key, value in ours.tensors.items():
        torch.testing.assert_close(value, theirs.tensors[key], rtol=1e-6, atol=1e-7)


def assert_same_delta(ours: LoraWeights, theirs: LoraWeights) -> None:
    assert ours.rank == theirs.rank and ours.modules() == theirs.modules()
    for module in ours.modules():
        torch.testing.assert_close(delta(ours, module), delta(theirs, module), rtol=1e-5, atol=1e-6)


FACTORWISE = [
    ("linear", {}),
    ("ties", {"density": 0.5, "majority_sign_method": "total"}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
]
DENSE = [
    ("svd", {}),
    ("svd", {"svd_rank": 5, "svd_full_matrices": False}),
    ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.6, "svd_rank": 6}),
]


@pytest.mark.parametrize(("method", "params"), FACTORWISE)
def test_factorwise_methods_equal_peft(peft_model, method: str, params: dict) -> None:
    weights = [0.7, -0.4]
    theirs = peft_merge(peft_model, ["a", "b"], weights, method, **params)
    ours = merge_adapters([from_peft(peft_model, n) for n in "ab"], weights, method, params)
    assert_same_factors(ours, theirs)
    assert ours.scaling == 1.0


@pytest.mark.parametrize(("method", "params"), DENSE)
def test_dense_methods_equal_peft(peft_model, method: str, params: dict) -> None:
    weights = [0.6, 0.9, -0.5]
    theirs = peft_merge(peft_model, ["a", "b", "c"], weights, method, **params)
    adapters = [from_peft(peft_model, n) for n in "abc"]
    ours = merge_adapters(adapters, weights, method, params)
    assert_same_delta(ours, theirs)
    assert ours.rank == params.get("svd_rank", 8)


def test_svd_clamp_equals_peft_factor_by_factor(peft_model) -> None:
    weights = [1.0, 0.5, 0.25]
    theirs = peft_merge(peft_model, ["a", "b", "c"], weights, "svd", svd_clamp=0.9)
    ours = merge_adapters(
        [from_peft(peft_model, n) for n in "abc"], weights, "svd", {"svd_clamp": 0.9}
    )
    assert_same_factors(ours, theirs)
    unclamped = merge_adapters([from_peft(peft_model, n) for n in "abc"], weights, "svd")
    module = ours.modules()[0]
    assert not torch.equal(delta(ours, module), delta(unclamped, module))  # clamping did bite


def test_cat_equals_peft_with_mixed_ranks_and_missing_modules(peft_model) -> None:
    weights = [0.3, 1.2, -0.8]
    theirs = peft_merge(peft_model, ["a", "b", "c"], weights, "cat")
    ours = merge_adapters([from_peft(peft_model, n) for n in "abc"], weights, "cat")
    assert_same_delta(ours, theirs)


@pytest.mark.parametrize(
    ("method", "params", "names"),
    [
        ("dare_linear", {"density": 0.5}, "ab"),
        ("dare_ties", {"density": 0.7, "majority_sign_method": "total"}, "ab"),
        ("dare_linear_svd", {"density": 0.5}, "abc"),
        ("dare_ties_svd", {"density": 0.4, "majority_sign_method": "frequency"}, "abc"),
    ],
)
def test_dare_equals_peft_given_the_same_masks(
    peft_model, monkeypatch: pytest.MonkeyPatch, method: str, params: dict, names: str
) -> None:
    """PEFT draws with torch.bernoulli on the global generator, and add_weighted_adapter first
    initialises the new adapter (consuming global draws): route its draws through a generator
    seeded like ours instead."""
    weights = [0.8, 0.5, -0.3][: len(names)]
    seed = 1234
    peft_gen = torch.Generator().manual_seed(seed)
    real = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, **kw: real(p, generator=peft_gen))
    theirs = peft_merge(peft_model, list(names), weights, method, **params)
    monkeypatch.undo()
    adapters = [from_peft(peft_model, n) for n in names]
    ours = merge_adapters(adapters, weights, method, {**params, "seed": seed})
    if method.endswith("_svd"):
        assert_same_delta(ours, theirs)
    else:
        assert_same_factors(ours, theirs)
    again = merge_adapters(adapters, weights, method, {**params, "seed": seed})
    other = merge_adapters(adapters, weights, method, {**params, "seed": seed + 1})
    key = next(iter(ours.tensors))
    assert torch.equal(again.tensors[key], ours.tensors[key])
    assert not torch.equal(other.tensors[key], ours.tensors[key])


def test_peft_merged_adapter_inherits_rslora_from_the_first_adapter(peft_model) -> None:
    """PEFT copies the first adapter's config (use_rslora=True here) with lora_alpha = r, so its
    merged adapter is applied at sqrt(r), not 1. Our factors are PEFT's; our scaling is 1."""
    theirs = peft_merge(peft_model, ["b", "a"], [0.5, 0.5], "linear")
    ours = merge_adapters([from_peft(peft_model, n) for n in "ba"], [0.5, 0.5], "linear")
    assert_same_factors(ours, LoraWeights(theirs.tensors, theirs.rank, theirs.lora_alpha))
    assert theirs.use_rslora and theirs.scaling == pytest.approx(math.sqrt(8))
    assert not ours.use_rslora and ours.scaling == 1.0


def small_adapter(seed: int, rank: int = 4, alpha: float = 8.0, shape=(12, 16)) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    return LoraWeights(
        {"m.lora_A.weight": torch.randn(rank, in_f, generator=g),
         "m.lora_B.weight": torch.randn(out_f, rank, generator=g)},
        rank=rank, lora_alpha=alpha,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_one_adapter_at_weight_one_is_itself(method: str) -> None:
    a = small_adapter(0, alpha=5.0)
    merged = merge_adapters([a], [1.0], method)
    torch.testing.assert_close(delta(merged, "m"), delta(a, "m"), **F32)
    # the method itself, not PEFT's single-adapter fallback to linear
    direct = MERGE_METHODS[method].fn([a], [1.0], validate_params(method, {}), None)
    torch.testing.assert_close(delta(direct, "m"), delta(a, "m"), **F32)


@pytest.mark.parametrize("method", ["ties_svd", "dare_linear_svd", "magnitude_prune_svd"])
def test_dense_methods_at_full_density_are_the_svd_merge(method: str) -> None:
    a = small_adapter(1)
    direct = MERGE_METHODS[method].fn([a], [1.0], validate_params(method, {"density": 1.0}), None)
    torch.testing.assert_close(delta(direct, "m"), delta(a, "m"), **F32)


def test_single_adapter_falls_back_to_linear_like_peft() -> None:
    a = small_adapter(2)
    pruned = merge_adapters([a], [1.0], "ties", {"density": 0.1})
    torch.testing.assert_close(delta(pruned, "m"), delta(a, "m"), **F32)


def test_dare_keeps_the_expectation() -> None:
    """Mean over many DARE draws -> the undropped merge (a missing 1/density rescale fails)."""
    a, b = small_adapter(3), small_adapter(4, alpha=2.0)
    density, draws = 0.3, 3000
    linear = merge_adapters([a, b], [0.6, 0.4], "linear")
    g = torch.Generator().manual_seed(0)
    total = {k: torch.zeros_like(v) for k, v in linear.tensors.items()}
    for _ in range(draws):
        dare = merge_adapters([a, b], [0.6, 0.4], "dare_linear", {"density": density}, g)
        for k in total:
            total[k] += dare.tensors[k]
    for k, value in linear.tensors.items():
        # per-entry std of the mean: |sum_k w_k t_k| terms * sqrt((1-d)/d / draws)
        sigma = value.abs().max() * math.sqrt((1 - density) / density / draws) * 2
        err = (total[k] / draws - value).abs().max()
        assert err < 5 * sigma, (k, float(err), float(sigma))
    deltas = [torch.randn(6, 5, generator=g) for _ in range(2)]
    w = torch.tensor([0.5, -1.5])
    mean = sum(tt.dare_linear(deltas, w, 0.5, g) for _ in range(draws)) / draws
    torch.testing.assert_close(mean, tt.task_arithmetic(deltas, w), atol=0.15, rtol=0)


def test_task_tensors_keep_peft_names_and_their_results() -> None:
    """Every function of PEFT's ``merge_utils`` has its namesake in ``task_tensors``, and each
    gives PEFT's result (DARE's random ones are compared above, given the same masks)."""
    from peft.utils import merge_utils as peft

    theirs = {n for n, f in vars(peft).items() if inspect.isfunction(f)
              and f.__module__ == peft.__name__}  # fmt: skip
    assert theirs and not theirs - set(vars(tt)), sorted(theirs - set(vars(tt)))
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, -1.0, 2.0])
    stacked = torch.stack(ts)
    same = [
        ("reshape_weight_task_tensors", (stacked, w)),
        ("magnitude_based_pruning", (ts[0], 0.3)),
        ("prune", (ts[1], 0.3, "magnitude")),
        ("calculate_majority_sign_mask", (stacked, "frequency")),
        ("calculate_majority_sign_mask", (stacked, "total")),
        ("disjoint_merge", (stacked, peft.calculate_majority_sign_mask(stacked))),
        ("task_arithmetic", (ts, w)),
        ("magnitude_prune", (ts, w, 0.4)),
        ("ties", (ts, w, 0.4, "frequency")),
        ("ties", (ts, w, 0.4, "total")),
    ]
    for name, args in same:
        assert torch.equal(getattr(tt, name)(*args), getattr(peft, name)(*args)), name


def test_validation_errors_are_clear() -> None:
    a, c = small_adapter(5), small_adapter(6, rank=2)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_adapters([a, a], [1, 1], "average")
    with pytest.raises(ValueError, match="density"):
        merge_adapters([a, a], [1, 1], "ties", {"density": 1.5})
    with pytest.raises(ValueError, match="density"):
        merge_adapters([a, a], [1, 1], "dare_ties", {})
    with pytest.raises(ValueError, match="densty"):
        merge_adapters([a, a], [1, 1], "ties", {"densty": 0.5})
    with pytest.raises(ValueError, match="majority_sign_method"):
        merge_adapters([a, a], [1, 1], "ties", {"density": 0.5, "majority_sign_method": "max"})
    with pytest.raises(ValueError, match="one rank"):
        merge_adapters([a, c], [1, 1], "linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        merge_adapters([a, a], [1.0], "linear")
    with pytest.raises(ValueError, match="finite"):
        merge_adapters([a, a], [1.0, math.nan], "cat")
    with pytest.raises(ValueError, match="different bases"):
        merge_adapters([a, small_adapter(7, shape=(12, 20))], [1, 1], "svd")
    assert isinstance(validate_params("ties", TiesParams(density=0.2)), TiesParams)
    assert validate_params("dare_linear", {"density": 0.5, "seed": 3}) == DareParams(
        density=0.5, seed=3
    )
    assert validate_params("svd", None) == SvdParams()


def test_mixed_ranks_and_missing_modules_in_dense_merges() -> None:
    a, c = small_adapter(8, rank=4), small_adapter(9, rank=2, alpha=1.0)
    c.tensors["n.lora_A.weight"] = torch.randn(2, 7)
    c.tensors["n.lora_B.weight"] = torch.randn(3, 2)
    merged = merge_adapters([a, c], [0.5, 2.0], "svd", {"svd_rank": 2})
    assert merged.rank == 2 and merged.modules() == ["m", "n"]
    torch.testing.assert_close(delta(merged, "n"), 2.0 * delta(c, "n"), rtol=1e-5, atol=1e-5)
    full = merge_adapters([a, c], [0.5, 2.0], "svd", {"svd_rank": 6})  # > min dim of n (3)
    assert full.tensors["n.lora_A.weight"].shape == (6, 7)
    for module, want in [
        ("m", 0.5 * delta(a, "m") + 2.0 * delta(c, "m")),
        ("n", 2 * delta(c, "n")),
    ]:
        torch.testing.assert_close(delta(full, module), want, rtol=1e-5, atol=1e-5)
