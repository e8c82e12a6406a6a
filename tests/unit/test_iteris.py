"""IterIS against explicit float64 feature matrices, and the statistics it is fed from.

References here form X_i and X̃_i explicitly: the alpha = 0 solution by least squares on the stacked
objective (an independent route, no normal equations), the alpha > 0 / blended one from the
official formula with explicit matrices and an explicit inverse.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_lora_ext.adapters.lora_weights import LoraWeights
from vllm_lora_ext.merge.iteris import IterisParams, iteris_layer, iteris_merge
from vllm_lora_ext.stats.accumulators import IterisStats, input_key

F64 = torch.float64
IN, OUT = 10, 7


def make_case(seed: int, ranks=(2, 3, 1), samples=4, tokens=9):
    """Per adapter: factors, explicit X_i [samples, tokens, in] and a perturbed X̃_i."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, generator=g, dtype=F64)
    factors, xs, xts = [], [], []
    for k, r in enumerate(ranks):
        a = torch.randn(r, IN, generator=g, dtype=F64)
        b = torch.randn(OUT, r, generator=g, dtype=F64)
        factors.append((a, b, 0.5 + k))
        x = torch.randn(samples, tokens, IN, generator=g, dtype=F64) * (1 + k)
        xs.append(x)
        xts.append(x + 0.3 * torch.randn(x.shape, generator=g, dtype=F64))
    return w0, factors, xs, xts


def grams(x: torch.Tensor, xt: torch.Tensor):
    x2, xt2 = x.reshape(-1, IN), xt.reshape(-1, IN)
    return x2.T @ x2, x2.T @ xt2, xt2.T @ xt2


def lam(w0, f, x) -> float:
    """λ_i as the official code computes it: per-sample Frobenius norms, summed over samples."""
    w = w0 + (0 if f is None else f[2] * f[1] @ f[0])
    per_sample = torch.linalg.matrix_norm(x @ w.T) ** 2  # [samples]
    return float(w.square().sum() / per_sample.sum())


def dense_formula(w0, factors, xs, xts, a1, a2, m, blend) -> torch.Tensor:
    term1 = torch.zeros(OUT, IN, dtype=F64)
    term2 = torch.zeros(IN, IN, dtype=F64)
    for f, x, xt, m_i in zip(factors, xs, xts, m, strict=True):
        x2 = x.reshape(-1, IN)
        xt2 = (1 - blend) * xt.reshape(-1, IN) + blend * x2
        c = x2.T @ xt2
        g = xt2.T @ xt2
        c = c + a1 * torch.linalg.matrix_norm(c) * torch.eye(IN, dtype=F64)
        g = g + a2 * torch.linalg.matrix_norm(g) * torch.eye(IN, dtype=F64)
        coef = lam(w0, f, x) * m_i
        dw = torch.zeros(OUT, IN, dtype=F64) if f is None else f[2] * f[1] @ f[0]
        term1 += coef * dw @ c
        term2 += coef * g
    return term1 @ torch.linalg.inv(term2)


def test_solution_is_the_least_squares_minimiser() -> None:
    w0, factors, xs, xts = make_case(0)
    m = [1.0, 2.0, 0.5]
    own, cross, merged = zip(*(grams(x, xt) for x, xt in zip(xs, xts, strict=True)), strict=True)
    a, b = iteris_layer(factors, w0, own, cross, merged, 0.0, 0.0, m)
    # min_ΔW Σ_i c_i ‖X̃_i ΔWᵀ - X_i ΔW_iᵀ‖²  as one stacked least-squares problem
    lhs, rhs = [], []
    for f, x, xt, m_i in zip(factors, xs, xts, m, strict=True):
        root = math.sqrt(lam(w0, f, x) * m_i)
        lhs.append(root * xt.reshape(-1, IN))
        rhs.append(root * x.reshape(-1, IN) @ (f[2] * f[1] @ f[0]).T)
    expected = torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs)).solution.T
    torch.testing.assert_close(b @ a, expected, rtol=1e-9, atol=1e-10)
    # exactly a LoRA of rank Σ r_i whose B is the concatenation of the B_i
    assert a.shape == (6, IN) and torch.equal(b, torch.cat([f[1] for f in factors], dim=1))


@pytest.mark.parametrize(
    ("a1", "a2", "blend"), [(1e-4, 1e-5, 0.0), (1e-7, 1e-7, 5e-4), (0, 0, 0.3)]
)
def test_matches_the_official_formula(a1: float, a2: float, blend: float) -> None:
    w0, factors, xs, xts = make_case(1)
    factors[1] = None  # adapter 1 does not adapt this layer: ΔW_1 = 0 still counts
    m = [1.5, 1.0, 0.7]
    own, cross, merged = zip(*(grams(x, xt) for x, xt in zip(xs, xts, strict=True)), strict=True)
    a, b = iteris_layer(factors, w0, own, cross, merged, a1, a2, m, blend)
    expected = dense_formula(w0, factors, xs, xts, a1, a2, m, blend)
    torch.testing.assert_close(b @ a, expected, rtol=1e-9, atol=1e-10)
    assert a.shape[0] == 2 + 1


def test_one_adapter_with_its_own_inputs_returns_itself() -> None:
    w0, factors, xs, _ = make_case(2, ranks=(3,), tokens=20)
    own = grams(xs[0], xs[0])
    a, b = iteris_layer(factors, w0, [own[0]], [own[1]], [own[2]], 1e-14, 1e-14)
    f = factors[0]
    torch.testing.assert_close(b @ a, f[2] * f[1] @ f[0], rtol=1e-8, atol=1e-9)


def adapters_and_stats(seed: int):
    """Two LoraWeights on a 2-module 'model' (q and v share an input), stats from explicit X."""
    g = torch.Generator().manual_seed(seed)
    modules = ["base_model.model.model.layers.0.self_attn.q_proj",
               "base_model.model.model.layers.0.self_attn.v_proj"]  # fmt: skip
    base = {m.removeprefix("base_model.model."): torch.randn(OUT, IN, generator=g) for m in modules}
    adapters = []
    for k, r in enumerate((2, 3)):
        tensors = {}
        for m in modules[: 2 - k]:  # adapter 1 lacks v_proj
            tensors[f"{m}.lora_A.weight"] = torch.randn(r, IN, generator=g)
            tensors[f"{m}.lora_B.weight"] = torch.randn(OUT, r, generator=g)
        adapters.append(LoraWeights(tensors, rank=r, lora_alpha=2.0 * r, use_rslora=k == 1))
    xs = [torch.randn(30, IN, generator=g) for _ in adapters]
    xts = [x + 0.2 * torch.randn(x.shape, generator=g) for x in xs]
    return modules, base, adapters, xs, xts


def test_merge_end_to_end_with_truncation(tmp_path: Path) -> None:
    modules, base, adapters, xs, xts = adapters_and_stats(3)
    key = input_key(modules[0])
    assert key == input_key(modules[1]) == "model.layers.0.self_attn.qkv_proj"
    stats = IterisStats()
    for name, x, xt in zip("ab", xs, xts, strict=True):
        stats.add(name, key, x[:10], xt[:10])
        stats.add(name, key, x[10:], xt[10:])
    full = iteris_merge(adapters, ["a", "b"], base, stats, IterisParams(alpha1=0, alpha2=0))
    assert full.weights.rank == 5 and full.weights.scaling == 1.0
    assert full.errors == dict.fromkeys(modules, 0.0)
    cut = iteris_merge(adapters, ["a", "b"], base, stats, IterisParams(rank=1, alpha1=0, alpha2=0))
    for module in modules:
        factors = [
            None if f"{module}.lora_A.weight" not in ad.tensors else
            (ad.tensors[f"{module}.lora_A.weight"].double(),
             ad.tensors[f"{module}.lora_B.weight"].double(), ad.scaling)
            for ad in adapters
        ]  # fmt: skip
        w0 = base[module.removeprefix("base_model.model.")].double()
        expected = dense_formula(
            w0, factors, [x.double()[None] for x in xs], [x.double()[None] for x in xts],
            0.0, 0.0, [1.0, 1.0], 0.0,
        )  # fmt: skip
        got = full.weights.tensors[f"{module}.lora_B.weight"].double()
        got = got @ full.weights.tensors[f"{module}.lora_A.weight"].double()
        torch.testing.assert_close(got, expected.float().double(), rtol=1e-4, atol=1e-5)
        # truncation to rank 1: the reported error is the true relative error, and optimal
        a1 = cut.weights.tensors[f"{module}.lora_A.weight"].double()
        b1 = cut.weights.tensors[f"{module}.lora_B.weight"].double()
        assert a1.shape == (1, IN)
        true_err = torch.linalg.matrix_norm(expected - b1 @ a1) / torch.linalg.matrix_norm(expected)
        s = torch.linalg.svdvals(expected)
        assert cut.errors[module] == pytest.approx(float(true_err), rel=1e-4)
        assert cut.errors[module] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)
        assert cut.errors[module] > 0.01


def test_first_iteration_and_scale_invariance() -> None:
    modules, base, adapters, xs, _ = adapters_and_stats(4)
    key = input_key(modules[0])
    once, twice, paired = IterisStats(), IterisStats(), IterisStats()
    for name, x in zip("ab", xs, strict=True):
        once.add(name, key, x)
        twice.add(name, key, torch.cat([x, x]))  # every sum doubled: λ_i G_i unchanged
        paired.add(name, key, x, x)  # X̃ = X given explicitly
    results = [iteris_merge(adapters, ["a", "b"], base, s).weights for s in (once, twice, paired)]
    for key_ in results[0].tensors:
        torch.testing.assert_close(results[1].tensors[key_], results[0].tensors[key_])
        torch.testing.assert_close(results[2].tensors[key_], results[0].tensors[key_])


def test_unpaired_rows_do_not_reweight_an_adapter() -> None:
    """Adapter a has its rows seen once paired and once more unpaired (xtx doubled, pairs not):
    the own Gram is rescaled to the paired count, so the result is the all-paired one."""
    modules, base, adapters, xs, xts = adapters_and_stats(7)
    key = input_key(modules[0])
    paired, extra = IterisStats(), IterisStats()
    for name, x, xt in zip("ab", xs, xts, strict=True):
        paired.add(name, key, x, xt)
        extra.add(name, key, x, xt)
    extra.add("a", key, xs[0])
    want = iteris_merge(adapters, ["a", "b"], base, paired).weights
    got = iteris_merge(adapters, ["a", "b"], base, extra).weights
    for key_ in want.tensors:
        torch.testing.assert_close(got.tensors[key_], want.tensors[key_])


def test_missing_statistics_and_bad_params_are_refused() -> None:
    modules, base, adapters, xs, _ = adapters_and_stats(5)
    stats = IterisStats()
    stats.add("a", input_key(modules[0]), xs[0])
    with pytest.raises(KeyError, match="'b'"):
        iteris_merge(adapters, ["a", "b"], base, stats)
    with pytest.raises(ValueError, match="manual weights"):
        stats.add("b", input_key(modules[0]), xs[1])
        iteris_merge(adapters, ["a", "b"], base, stats, IterisParams(manual_weights=(1.0,)))
    with pytest.raises(ValueError):
        IterisParams(alpha1=-1.0)


def test_stats_add_up_and_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    x, xt = torch.randn(40, IN, generator=g), torch.randn(40, IN, generator=g)
    whole, first, second = IterisStats(), IterisStats(), IterisStats()
    whole.add("a", "k", x, xt)
    whole.add("b", "k", x)
    first.add("a", "k", x[:15], xt[:15])
    second.add("a", "k", x[15:], xt[15:])
    second.add("b", "k", x)
    summed = first + second
    assert set(summed.entries) == set(whole.entries)
    for k, s in whole.entries.items():
        t = summed.entries[k]
        assert (t.tokens, t.paired_tokens) == (s.tokens, s.paired_tokens)
        for field in ("xtx", "cross", "merged"):
            want, got = getattr(s, field), getattr(t, field)
            assert (want is None) == (got is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    x64 = x.double()
    torch.testing.assert_close(whole.get("a", "k").cross, x64.T @ xt.double())
    path = tmp_path / "stats.safetensors"
    summed.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temp file left
    loaded = IterisStats.load(path)
    for k, s in summed.entries.items():
        t = loaded.entries[k]
        assert (t.tokens, t.paired_tokens) == (s.tokens, s.paired_tokens)
        assert torch.equal(t.xtx, s.xtx) and t.xtx.dtype == F64
        assert (t.cross is None) == (s.cross is None)
    with pytest.raises(ValueError, match="shapes"):
        whole.merge(_one("a", "k", torch.randn(3, IN + 1)))


def _one(adapter: str, key: str, x: torch.Tensor) -> IterisStats:
    s = IterisStats()
    s.add(adapter, key, x)
    return s


def test_other_versions_and_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    _one("a", "k", torch.randn(4, IN)).save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**meta, "version": "999"})
    with pytest.raises(ValueError, match="version '999'"):
        IterisStats.load(path)
    save_file(tensors, str(path), metadata={**meta, "format": "something-else"})
    with pytest.raises(ValueError, match="not a"):
        IterisStats.load(path)
