"""A vLLM punica wrapper for CUDA that applies LoRA linear layers with :mod:`lora_kernels`.

Selected by ``vllm_boundary/patches.py`` (``VLLM_LORA_EXT_GPU_PUNICA=ours``); vLLM's
``PunicaWrapperGPU`` stays the fallback for everything not overridden here (embeddings, logits,
MoE, dual-stream writes).

Only ``add_lora_linear`` is routed: it is where shrink+expand can be fused. The work lists are
built once per step in :meth:`update_metadata` (outside CUDA graphs, no host sync) into
persistent buffers, one per block size of ``lora_kernels/configs``; the kernels run inside a
registered torch custom op so ``torch.compile`` treats them as opaque, as vLLM's own ops are.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

from lora_kernels.configs import load_entries, select_config
from lora_kernels.metadata import (
    SliceTable,
    WorkList,
    build_slice_table,
    build_work_list,
    live_rank,
)
from lora_kernels.metadata import max_work_items as _max_work
from lora_kernels.multi_lora import launch, r_block_for

_UNKNOWN_RANK = 1 << 30  # clamped to the stack's rank in the op
_LAUNCHED: list[bool] = []  # logged once per process: what serves LoRA is worth one line
_FELL_BACK: list[bool] = []
logger = logging.getLogger("vllm.lora_ext")  # under vLLM's logger: shown with its lines
_TABLES: dict[tuple, SliceTable] = {}
_SCALES: dict[tuple, torch.Tensor] = {}
_LIVE: dict[tuple, torch.Tensor] = {}


def _stacks_key(lora_a: list[torch.Tensor], lora_b: list[torch.Tensor]) -> tuple:
    # Keyed like vLLM's own pointer LUT: filled during profiling, before any graph capture.
    return tuple((t.data_ptr(), *t.shape) for t in (*lora_a, *lora_b))


def _slice_table(lora_a: list[torch.Tensor], lora_b: list[torch.Tensor]) -> SliceTable:
    key = _stacks_key(lora_a, lora_b)
    if key not in _TABLES:
        _TABLES[key] = build_slice_table(lora_a, lora_b)
    return _TABLES[key]


def _live_ranks(lora_a: list[torch.Tensor], lora_b: list[torch.Tensor]) -> torch.Tensor:
    """One module's live rank per slice and slot ``[slices, slots]`` int32, on its device, kept
    for the life of its stacks (CUDA graphs read it in place); unknown: the full rank."""
    key = _stacks_key(lora_a, lora_b)
    if key not in _LIVE:
        shape = (len(lora_a), lora_a[0].shape[0])
        _LIVE[key] = torch.full(shape, _UNKNOWN_RANK, dtype=torch.int32, device=lora_a[0].device)
    return _LIVE[key]


def _scales(table: SliceTable, scale: float, device: torch.device) -> torch.Tensor:
    # vLLM bakes alpha/r into B: one scale for every slot.
    key = (table.num_slots, scale, device)
    if key not in _SCALES:
        _SCALES[key] = torch.full((table.num_slots,), scale, dtype=torch.float32, device=device)
    return _SCALES[key]


@torch.library.custom_op("vllm_lora_ext::multi_lora_linear", mutates_args=("y",))
def multi_lora_linear(
    y: torch.Tensor,  # [T, Σ N_s]
    x: torch.Tensor,  # [T, H]
    lora_a: list[torch.Tensor],  # per slice [slots, 1, R, H]
    lora_b: list[torch.Tensor],  # per slice [slots, 1, N_s, R]
    token_mapping: torch.Tensor,  # [>= mapped tokens] slot per token, -1 = none
    works: list[torch.Tensor],  # per block size [max_work(T_max), 3] prebuilt work list
    sorted_tokens: list[torch.Tensor],  # per block size [T_max]
    block_ms: list[int],
    num_mapped: torch.Tensor,  # CPU int64 [1]: tokens the prebuilt lists describe
    no_lora: torch.Tensor,  # CPU bool [1]
    slot_ranks: torch.Tensor,  # [slots] int32 rank of the adapter in each slot (device)
    scale: float,
) -> None:
    if no_lora.item() or x.shape[0] == 0:
        return
    table = _slice_table(lora_a, lora_b)
    # Each slot computes with its adapter's own rank: the columns vLLM zero-pads up to
    # max_lora_rank are not loaded (the kernels mask by rank, rounded up to 8); a slice the
    # adapter does not target (live rank 0) is skipped.
    ranks = slot_ranks.clamp(max=table.r_max)
    live = _live_ranks(lora_a, lora_b)
    scales = _scales(table, scale, x.device)
    num_tokens = x.shape[0]
    cfg = select_config(num_tokens, r_block_for(table.r_max))
    if num_tokens >= int(num_mapped.item()) and cfg.block_m in block_ms:
        # Padding tokens past num_mapped (CUDA-graph sizes) are in no work item: untouched.
        i = block_ms.index(cfg.block_m)
        n = _max_work(num_tokens, table.num_slots, cfg.block_m)
        work = WorkList(works[i][:n], sorted_tokens[i][:num_tokens], cfg.block_m, num_tokens)
    else:  # fewer rows than mapped (dummy runs): build a list for exactly these rows
        work = build_work_list(token_mapping[:num_tokens], table.num_slots, cfg.block_m)
    launch(y, x, table, token_mapping[:num_tokens], ranks, scales, table.r_max, work, cfg, live)
    if not _LAUNCHED:
        _LAUNCHED.append(True)
        logger.info("vllm-lora-ext: LoRA linear layers run on lora_kernels (%d slots, rank "
                    "<= %d)", table.num_slots, table.r_max)  # fmt: skip


@multi_lora_linear.register_fake
def _(y, x, lora_a, lora_b, token_mapping, works, sorted_tokens, block_ms, num_mapped, no_lora,
      slot_ranks, scale) -> None:  # fmt: skip
    return None


class KernelLinearPath:
    """``add_lora_linear`` on :mod:`lora_kernels`, with its per-step metadata: mixed into a vLLM
    punica wrapper (first in the MRO), which keeps everything else. On CUDA that is
    :class:`LoraKernelsPunicaWrapperGPU`; on CPU (kernels interpreted) the same code runs inside
    a real vLLM server, for tests (:class:`LoraKernelsPunicaWrapperInterpreted`)."""

    def _init_kernel_buffers(
        self, max_num_batched_tokens: int, device: torch.device | str, max_loras: int
    ) -> None:
        self.max_loras = max_loras
        self._block_ms = sorted({e.config.block_m for e in load_entries()})
        self._works = [
            torch.full((_max_work(max_num_batched_tokens, max_loras, bm), 3), -1,
                       dtype=torch.int32).to(device)
            for bm in self._block_ms
        ]  # fmt: skip
        self._sorted = [
            torch.zeros(max_num_batched_tokens, dtype=torch.int32, device=device)
            for _ in self._block_ms
        ]
        # CPU tensors, not Python values: torch.compile would bake those into the graph.
        self._num_mapped = torch.zeros(1, dtype=torch.int64)
        self._no_lora = torch.ones(1, dtype=torch.bool)
        self.slot_ranks: list[int] = [_UNKNOWN_RANK] * max_loras
        """Rank of the adapter in each slot, told by the LoRA manager when it fills the slot
        (``set_slot_rank``, patched in by ``vllm_boundary/patches.py``); unknown: the stack's
        full rank."""
        self._slot_ranks = torch.full((max_loras,), _UNKNOWN_RANK, dtype=torch.int32, device=device)

    def set_slot_rank(self, index: int, rank: int) -> None:
        self.slot_ranks[index] = int(rank)

    def note_live_ranks(
        self,
        lora_a_stacked: tuple[torch.Tensor, ...],  # one module's, per slice [slots, 1, R, H]
        lora_b_stacked: tuple[torch.Tensor, ...],  # per slice [slots, 1, N_s, R]
        index: int,
    ) -> None:
        """The slot ``index`` was just filled (``vllm_boundary/patches.py``): note how many of
        its rank rows each slice of this module holds; 0 (a slice or module the adapter does
        not target) makes the kernels skip it. Reads the device once per slice: when a slot is
        filled, never per step."""
        a, b = list(lora_a_stacked), list(lora_b_stacked)
        live = _live_ranks(a, b)
        for s, (a_s, b_s) in enumerate(zip(a, b, strict=True)):
            if a_s.dim() == 4 and b_s.dim() == 4:
                live[s, index] = live_rank(a_s, b_s, index)

    def update_metadata(
        self,
        mapping: Any,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs,
    ):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # From the host-side mapping (LoRA id 0 = none): no device read.
        self._no_lora[0] = not any(i > 0 for i in mapping.index_mapping)
        # Host to device, outside any graph, never a read back.
        ranks = torch.tensor(self.slot_ranks, dtype=torch.int32)
        self._slot_ranks.copy_(ranks, non_blocking=True)
        self._build_work_lists(self.token_lora_indices)

    def _build_work_lists(self, indices: torch.Tensor) -> None:
        """This step's work lists into the persistent buffers: device ops only, no value read
        back to the host (tested under FakeTensorMode, where any such read fails)."""
        self._num_mapped[0] = indices.shape[0]
        for bm, work_buf, sorted_buf in zip(self._block_ms, self._works, self._sorted, strict=True):
            if indices.shape[0] == 0:
                break
            wl = build_work_list(indices, self.max_loras, bm)
            work_buf[: wl.max_work].copy_(wl.work)
            work_buf[wl.max_work :, 0] = -1
            sorted_buf[: wl.num_tokens].copy_(wl.sorted_tokens)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """y[t, slice s] += scale · (x[t] @ A_s[i]ᵀ) @ B_s[i]ᵀ, i = slot of t (-1: untouched)."""
        if not self._supported(y, x, lora_a_stacked, lora_b_stacked, output_slices, kwargs):
            if not _FELL_BACK:
                _FELL_BACK.append(True)
                logger.warning("vllm-lora-ext: a LoRA linear call (dtype %s, %d slices, %s) is "
                               "not one lora_kernels implements: vLLM's ops serve it",
                               x.dtype, len(output_slices), sorted(kwargs))  # fmt: skip
            return super().add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            )
        x2 = x.view(-1, x.shape[-1])
        multi_lora_linear(
            y.view(-1, y.shape[-1]), x2, list(lora_a_stacked), list(lora_b_stacked),
            self._token_lora_indices, self._works, self._sorted, self._block_ms,
            self._num_mapped, self._no_lora, self._slot_ranks,
            float(scale),
        )  # fmt: skip

    @staticmethod
    def _supported(y, x, lora_a, lora_b, output_slices, kwargs) -> bool:
        """Only what the kernels implement; anything else goes to vLLM unchanged.

        Traced by torch.compile (vLLM compiles with ``fullgraph=True``): dtypes, shapes and
        layouts only. Data pointers cannot be traced; 16-byte alignment of the stacks is
        asserted inside the opaque op (``build_slice_table``); torch's allocators give it.
        """
        if not kwargs.get("add_inputs", True) or set(kwargs) - {"add_inputs"}:
            return False  # dual-stream writes, or arguments we do not know
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or y.dtype != x.dtype:
            return False
        if not (len(lora_a) == len(lora_b) == len(output_slices)) or not y.is_contiguous():
            return False
        if y.shape[-1] != sum(output_slices):
            return False
        return all(
            a.dtype == x.dtype and b.dtype == x.dtype and b.shape[-2] == n and a.is_contiguous()
            and b.is_contiguous()
            for a, b, n in zip(lora_a, lora_b, output_slices, strict=True)
        )  # fmt: skip


class LoraKernelsPunicaWrapperGPU(KernelLinearPath, PunicaWrapperGPU):
    """vLLM's GPU wrapper with ``add_lora_linear`` on our fused/two-pass kernels."""

    def __init__(
        self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs
    ):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._init_kernel_buffers(max_num_batched_tokens, device, self.max_loras)
