"""A vLLM punica wrapper for CPU that runs :mod:`segment_ops` instead of per-token gathers.

Selected by ``vllm_boundary/patches.py`` on the CPU platform (setting
``VLLM_LORA_EXT_CPU_PUNICA=ours``, the default); vLLM's ``PunicaWrapperCPU`` remains the
fallback (``=vllm``). The adapter grouping is computed once per batch in
:meth:`update_metadata` and shared by every LoRA layer of the step.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from vllm_lora_ext.cpu_lora import segment_ops
from vllm_lora_ext.cpu_lora.segment_ops import TokenGroups, group_tokens


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """Same semantics as vLLM's CPU wrapper (index -1 untouched), one matmul per adapter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token_groups = TokenGroups((), None, 0)
        self._sampler_groups = TokenGroups((), None, 0)

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._token_groups = group_tokens(self.token_lora_indices)
        self._sampler_groups = group_tokens(self.sampler_indices)

    def _groups(self, cached: TokenGroups, indices: torch.Tensor, num_rows: int) -> TokenGroups:
        # Dummy/profile runs may hand us more or fewer rows than the mapping describes.
        if num_rows == cached.num_tokens:
            return cached
        return group_tokens(indices[:num_rows])

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        x = x.view(-1, x.shape[-1])
        groups = self._groups(self._token_groups, self.token_lora_indices, x.shape[0])
        segment_ops.shrink(y, x, lora_a_stacked, scale, groups)

    def add_expand(
        self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs
    ):
        y_2d = y.view(-1, y.shape[-1])
        groups = self._groups(self._token_groups, self.token_lora_indices, y_2d.shape[0])
        segment_ops.expand(y_2d, x, lora_b_stacked, output_slices, groups, offset_start, add_inputs)

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        groups = self._groups(self._token_groups, self.token_lora_indices, x.shape[0])
        size = min(lora_b_stacked.shape[-2], y.shape[-1])
        segment_ops.expand(y, (x,), (lora_b_stacked,), (size,), groups, 0, add_inputs)

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kw
    ):
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        y_2d = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        groups = self._groups(self._token_groups, self.token_lora_indices, x.shape[0])
        segment_ops.lora_linear(
            y_2d, x, lora_a_stacked, lora_b_stacked, scale, output_slices, groups
        )

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kw):
        y_2d = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        groups = self._groups(self._sampler_groups, self.sampler_indices, x.shape[0])
        size = min(lora_b_stacked.shape[-2], y_2d.shape[-1])
        segment_ops.lora_linear(
            y_2d, x, (lora_a_stacked,), (lora_b_stacked,), scale, (size,), groups
        )
