"""Our GPU punica wrapper: signatures pinned to vLLM's, and its glue run on CPU tensors.

The CUDA path cannot run here, but the wrapper's own logic (per-step work lists in persistent
buffers, the custom op, the fallbacks) runs on CPU tensors with the kernels interpreted.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

from lora_kernels.testing import TOLERANCES, make_problem, multi_lora_ref
from vllm_lora_ext.gpu_lora.punica_wrapper import LoraKernelsPunicaWrapperGPU

OVERRIDDEN = ("__init__", "update_metadata", "add_lora_linear")


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_overrides_keep_vllms_signatures(name):
    ours = inspect.signature(getattr(LoraKernelsPunicaWrapperGPU, name))
    theirs = inspect.signature(getattr(PunicaWrapperGPU, name))
    assert list(ours.parameters) == list(theirs.parameters), name
    for p, q in zip(ours.parameters.values(), theirs.parameters.values(), strict=True):
        assert (p.kind, p.default) == (q.kind, q.default), f"{name}({p.name})"


def test_everything_else_is_vllms():
    from vllm_lora_ext.gpu_lora.punica_wrapper import KernelLinearPath

    own = {
        k
        for cls in (KernelLinearPath, LoraKernelsPunicaWrapperGPU)
        for k, v in vars(cls).items()
        if inspect.isfunction(v)
    }
    helpers = {
        "_supported", "_build_work_lists", "set_slot_rank", "note_live_ranks",
        "_init_kernel_buffers",
    }  # fmt: skip
    assert own - helpers == set(OVERRIDDEN)
    assert issubclass(LoraKernelsPunicaWrapperGPU, PunicaWrapperGPU)


@pytest.fixture(autouse=True)
def _kernel_meta_on_cpu(monkeypatch):
    # punica_gpu imports LoRAKernelMeta only when vLLM finds a Triton driver (none on CPU);
    # the class itself is plain torch.
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.punica_wrapper import punica_gpu

    monkeypatch.setattr(punica_gpu, "LoRAKernelMeta", LoRAKernelMeta, raising=False)
    # Keyed by data pointer, as vLLM's own tables: freed test tensors reuse addresses.
    from vllm_lora_ext.gpu_lora import punica_wrapper

    monkeypatch.setattr(punica_wrapper, "_TABLES", {})
    monkeypatch.setattr(punica_wrapper, "_LIVE", {})


def make_wrapper(max_loras: int, max_tokens: int) -> LoraKernelsPunicaWrapperGPU:
    cfg = SimpleNamespace(max_loras=max_loras, specialize_active_lora=False)
    return LoraKernelsPunicaWrapperGPU(max_tokens, 8, device="cpu", lora_config=cfg)


def set_mapping(w: LoraKernelsPunicaWrapperGPU, slots: list[int], max_loras: int) -> None:
    ids = list(range(1, max_loras + 1))  # slot i holds LoRA id i + 1
    mapping = LoRAMapping(tuple(s + 1 if s >= 0 else 0 for s in slots), (0,), is_prefill=True)
    w.update_metadata(mapping, ids, max_loras, vocab_size=32)


@pytest.mark.parametrize("padding", [0, 3])
def test_add_lora_linear_through_the_custom_op(padding):
    """qkv-like slices, vLLM's [slots, 1, ...] stacks, padded CUDA-graph rows left untouched."""
    p = make_problem(torch.float16, 13 + padding, [16, 16, 16], sizes=(32, 16, 16), hidden=64,
                     offset_start=0, tail=0)  # fmt: skip
    slots = [0, 2, -1, 1, 1, 0, 2, 2, -1, 0, 1, 2, 0]
    w = make_wrapper(3, 64)
    set_mapping(w, slots, 3)
    assert w.token_lora_indices.tolist() == slots
    a = tuple(t.unsqueeze(1) for t in p.lora_a)
    b = tuple(t.unsqueeze(1) for t in p.lora_b)
    y = p.fresh_y()
    w.add_lora_linear(y, p.x, a, b, 0.5, (32, 16, 16))
    idx = torch.tensor(slots + [-1] * padding)
    ref = multi_lora_ref(p.y0, p.x, p.lora_a, p.lora_b, idx, p.ranks, torch.full((3,), 0.5))
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float16])
    assert torch.equal(y[idx < 0], p.y0[idx < 0])


def test_no_lora_batch_and_unsupported_calls(monkeypatch):
    p = make_problem(torch.float16, 4, [16, 16], sizes=(32,), hidden=64, offset_start=0, tail=0)
    w = make_wrapper(2, 16)
    set_mapping(w, [-1, -1, -1, -1], 2)
    a, b = (p.lora_a[0].unsqueeze(1),), (p.lora_b[0].unsqueeze(1),)
    y = p.fresh_y()
    w.add_lora_linear(y, p.x, a, b, 1.0, (32,))
    assert torch.equal(y, p.y0), "all -1: nothing applied"

    calls = []
    monkeypatch.setattr(PunicaWrapperGPU, "add_lora_linear", lambda *a, **k: calls.append(k))
    set_mapping(w, [0, 1, -1, 0], 2)
    w.add_lora_linear(p.fresh_y(), p.x, a, b, 1.0, (32,), add_inputs=False)  # dual-stream write
    w.add_lora_linear(p.fresh_y().float(), p.x.float(), a, b, 1.0, (32,))  # fp32 activations
    assert len(calls) == 2, "both went to vLLM's implementation"


def test_work_lists_are_built_without_reading_the_device():
    """Under FakeTensorMode no tensor has values: any op that must read one back to the host
    (``.item()``, ``torch.bincount``'s data-dependent size, a ``nonzero``) raises. Our part of
    ``update_metadata`` runs there whole, so it cannot sync a GPU or break a CUDA graph."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
    )

    w = make_wrapper(4, 64)
    set_mapping(w, [0, 3, -1, 2, 2, 1, -1, 0, 3], 4)
    real = w.token_lora_indices.clone()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        w._works = [mode.from_tensor(t) for t in w._works]
        w._sorted = [mode.from_tensor(t) for t in w._sorted]
        w._num_mapped = mode.from_tensor(w._num_mapped)
        w._build_work_lists(mode.from_tensor(real))
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            torch.bincount(mode.from_tensor(real.long()))  # the detector works


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_add_lora_linear_compiles_with_fullgraph(backend):
    """vLLM compiles the model with ``fullgraph=True``: our wrapper's Python must trace without
    a graph break, the kernel an opaque custom op (its fake impl used by aot_eager)."""
    p = make_problem(torch.float16, 9, [16, 16], sizes=(32, 16), hidden=64, offset_start=0,
                     tail=0)  # fmt: skip
    slots = [0, 1, -1, 1, 0, 0, -1, 1, 1]
    w = make_wrapper(2, 64)
    set_mapping(w, slots, 2)
    a = tuple(t.unsqueeze(1) for t in p.lora_a)
    b = tuple(t.unsqueeze(1) for t in p.lora_b)

    def apply(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w.add_lora_linear(y, x, a, b, 0.5, (32, 16))
        return y

    torch._dynamo.reset()
    compiled = torch.compile(apply, fullgraph=True, backend=backend)
    y = compiled(p.fresh_y(), p.x)
    ref = multi_lora_ref(p.y0, p.x, p.lora_a, p.lora_b, torch.tensor(slots), p.ranks,
                         torch.full((2,), 0.5))  # fmt: skip
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float16])


def test_each_slot_computes_with_its_own_rank():
    """Mixed ranks in one batch (told per slot, as vLLM's manager does when it fills a slot),
    against the float64 reference; every column past a slot's rank rounded up to 8 is NaN, so
    reading one would show. Between the rank and its round-up (rank 4 here) the kernels load
    but weigh by zero: vLLM zero-pads there."""
    ranks = [4, 16, 8]
    p = make_problem(torch.float16, 11, ranks, sizes=(32, 16), hidden=64, offset_start=0, tail=0)
    for a, b in zip(p.lora_a, p.lora_b, strict=True):
        for slot, rank in enumerate(ranks):
            rank8 = -(-rank // 8) * 8
            a[slot, rank:rank8], b[slot, :, rank:rank8] = 0, 0
            a[slot, rank8:], b[slot, :, rank8:] = float("nan"), float("nan")
    slots = [0, 2, -1, 1, 1, 0, 2, 2, -1, 0, 1]
    w = make_wrapper(3, 64)
    for slot, rank in enumerate(ranks):
        w.set_slot_rank(slot, rank)
    set_mapping(w, slots, 3)
    y = p.fresh_y()
    a = tuple(t.unsqueeze(1) for t in p.lora_a)
    b = tuple(t.unsqueeze(1) for t in p.lora_b)
    w.add_lora_linear(y, p.x, a, b, 0.5, (32, 16))
    assert torch.isfinite(y).all()
    clean_a = [t.nan_to_num(0.0) for t in p.lora_a]
    clean_b = [t.nan_to_num(0.0) for t in p.lora_b]
    ref = multi_lora_ref(p.y0, p.x, clean_a, clean_b, torch.tensor(slots), p.ranks,
                         torch.full((3,), 0.5))  # fmt: skip
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float16])


def test_slices_and_modules_an_adapter_does_not_target_are_skipped():
    """vLLM leaves the slices an adapter does not target at zero in its slot; told so when the
    slot is filled (``note_live_ranks``), the kernels skip them: NaN written there afterwards is
    never read. Slot 0 is a q/v adapter (k untouched), slot 1 targets nothing of this module."""
    p = make_problem(torch.float16, 10, [16, 16], sizes=(32, 16, 16), hidden=64,
                     offset_start=0, tail=0)  # fmt: skip
    p.lora_a[1][0], p.lora_b[1][0] = 0, 0
    for s in range(3):
        p.lora_a[s][1], p.lora_b[s][1] = 0, 0
    a = tuple(t.unsqueeze(1) for t in p.lora_a)
    b = tuple(t.unsqueeze(1) for t in p.lora_b)
    w = make_wrapper(2, 64)
    for slot in (0, 1):
        w.note_live_ranks(a, b, slot)
    for t in (*a, *b):  # what the kernels must not read any more
        t.masked_fill_(t == 0, float("nan"))
    slots = [0, 1, -1, 0, 1, 1, 0, -1, 0, 1]
    set_mapping(w, slots, 2)
    y = p.fresh_y()
    w.add_lora_linear(y, p.x, a, b, 0.5, (32, 16, 16))
    assert torch.isfinite(y).all()
    live = torch.tensor([[16, 0], [0, 0], [16, 0]], dtype=torch.int32)
    idx = torch.tensor(slots)
    clean_a = [t.nan_to_num(0.0) for t in p.lora_a]
    clean_b = [t.nan_to_num(0.0) for t in p.lora_b]
    ref = multi_lora_ref(p.y0, p.x, clean_a, clean_b, idx, p.ranks, torch.full((2,), 0.5),
                         live_ranks=live)  # fmt: skip
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float16])
    assert torch.equal(y[idx != 0], p.y0[idx != 0]), "slot 1 targets nothing here"
    assert torch.equal(y[idx == 0, 32:48], p.y0[idx == 0, 32:48]), "k is not slot 0's"
