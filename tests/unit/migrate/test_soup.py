"""The student soup: the mean of several students' deltas, cut back to one student's rank.
Oracle: float64 dense deltas and torch's SVD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lora_ext.adapters.lora_weights import LoraWeights, load_lora, save_lora
from vllm_lora_ext.adapters.validation import check_file_names
from vllm_lora_ext.migrate.soup import mean_delta, save_soup, truncated_with_errors

MODULES = ("m.layers.0.q_proj", "m.layers.0.v_proj")


def random_lora(seed: int, rank: int, alpha: float, out: int = 12, inp: int = 10) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[f"{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return LoraWeights(tensors=tensors, rank=rank, lora_alpha=alpha)


def dense(w: LoraWeights, module: str) -> torch.Tensor:
    return w.delta(module, torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    alphas=st.lists(st.sampled_from([1.0, 8.0, 16.0]), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_mean_delta_is_exactly_the_mean_of_the_students_deltas(ranks, alphas, seed) -> None:
    students = [random_lora(seed + i, r, alphas[i]) for i, r in enumerate(ranks)]
    soup = mean_delta(students)
    assert soup.rank == sum(ranks)
    for m in MODULES:
        want = torch.stack([dense(s, m) for s in students]).mean(0)
        torch.testing.assert_close(dense(soup, m), want, rtol=1e-5, atol=1e-5)


def test_the_cut_is_the_best_approximation_of_the_mean_at_that_rank() -> None:
    students = [random_lora(s, 4, 8.0) for s in range(3)]
    mean = mean_delta(students)
    cut, errors = truncated_with_errors(mean, 4)
    assert cut.rank == 4 and set(errors) == set(MODULES)
    for m in MODULES:
        full = dense(mean, m)
        u, s, vh = torch.linalg.svd(full)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(dense(cut, m), best, rtol=1e-4, atol=1e-4)
        want_error = (s[4:].square().sum() / s.square().sum()).sqrt().item()
        assert errors[m] == pytest.approx(want_error, rel=1e-4)
    # 11: above the modules' smaller side (10) but below the mean's rank (12), where the core
    # has fewer singular values than the rank asked for; 12: the mean's own rank
    for rank in (11, 12):
        whole, none_lost = truncated_with_errors(mean, rank)
        assert whole.rank == rank and max(none_lost.values()) < 1e-6
        for m in MODULES:
            torch.testing.assert_close(dense(whole, m), dense(mean, m), rtol=1e-4, atol=1e-4)


def test_save_soup_replaces_the_adapter_directory_in_one_piece(tmp_path: Path) -> None:
    dirs = []
    for s in range(2):
        d = tmp_path / f"student-{s}"
        save_lora(random_lora(s, 4, 8.0), d, "some/base")
        dirs.append(d)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.bin").write_text("from an earlier run")
    report = save_soup(dirs, out, rank=4)
    assert not (out / "stale.bin").exists()
    check_file_names(p.name for p in out.iterdir())  # PEFT files only: a server registers it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "student-0", "student-1"]
    soup = load_lora(out)
    mean = mean_delta([load_lora(d) for d in dirs])
    cut, errors = truncated_with_errors(mean, 4)
    assert soup.rank == 4 and report["max_cut_error"] == pytest.approx(max(errors.values()))
    for m in MODULES:
        torch.testing.assert_close(dense(soup, m), dense(cut, m), rtol=1e-5, atol=1e-5)
    whole = save_soup(dirs, tmp_path / "whole", rank=None)
    assert whole == {"soup_of": [str(d) for d in dirs], "rank": 8, "max_cut_error": 0.0,
                     "mean_cut_error": 0.0}  # fmt: skip
