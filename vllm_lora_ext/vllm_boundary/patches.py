"""The patches of vLLM's classes, each beside what it expects of vLLM (its guard).

Every patch is idempotent (marked with ``_vllm_lora_ext*``, the original kept as
``__wrapped__``) and runs in the engine worker, except :func:`patch_request_service_levels`
(API server). :func:`apply` checks every guard first (:data:`GUARDS`) and refuses to start,
naming each mismatch, when the installed vLLM moved any of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vllm_lora_ext.vllm_boundary import worker
from vllm_lora_ext.vllm_boundary.guards import Expect

OUR_CPU_PUNICA = "vllm_lora_ext.cpu_lora.punica_wrapper.GroupedPunicaWrapperCPU"
OUR_GPU_PUNICA = "vllm_lora_ext.gpu_lora.punica_wrapper.LoraKernelsPunicaWrapperGPU"
OUR_INTERPRETED_PUNICA = "vllm_lora_ext.gpu_lora.interpreted.LoraKernelsPunicaWrapperInterpreted"

_LINEAR = "vllm.lora.layers.base_linear"
_MANAGER = "vllm.lora.model_manager"
_OUTPUTS = "vllm.v1.engine.output_processor"
_PUNICA = "vllm.lora.punica_wrapper"
_LORA_ARGS = ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices")

CAPTURE_GUARDS = (
    Expect(_LINEAR, "BaseLinearLayerWithLoRA._apply_lora_to_output", "traffic capture hook",
           params=("self", "x", "output")),
    Expect(f"{_PUNICA}.punica_base", "PunicaWrapperBase.token_lora_indices",
           "traffic capture reads each token's slot", is_property=True),
)  # fmt: skip
LOAD_AHEAD_GUARDS = (
    Expect("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter",
           "loads ahead replace the adapter read", params=("self", "lora_request")),
    Expect("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter",
           "the engine step reads adapters through _load_adapter",
           contains=("self._load_adapter(lora_request)",)),
    Expect("vllm.lora.lora_model", "LoRAModel.__init__", "a loaded-ahead adapter gets its id",
           assigns=("id",)),
    Expect("vllm.lora.request", "LoRARequest", "LoRARequest(name, id, path), positional",
           fields=("lora_name", "lora_int_id", "lora_path")),
)  # fmt: skip
SERVICE_LEVEL_GUARDS = (
    Expect(_OUTPUTS, "OutputProcessor._update_stats_from_finished", "per-adapter TTFT/TPOT",
           params=("self", "req_state", "finish_reason", "iteration_stats")),
    Expect(_OUTPUTS, "RequestState.__init__", "per-adapter TTFT/TPOT read the request's adapter",
           assigns=("lora_name", "stats")),
    Expect("vllm.v1.metrics.stats", "RequestStateStats", "per-adapter TTFT/TPOT timestamps",
           fields=("num_generation_tokens", "first_token_ts", "last_token_ts",
                   "first_token_latency")),
)  # fmt: skip
CPU_SHRINK_GUARDS = (
    Expect("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink", "CPU base-token fix",
           params=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor",
                   "scaling")),
    Expect("vllm.lora.ops.torch_ops.lora_ops", "sgmv_shrink",
           "CPU base-token fix reaches prefill through bgmv_shrink", contains=("bgmv_shrink(",)),
    Expect(f"{_PUNICA}.punica_cpu", "bgmv_shrink", "CPU base-token fix: the wrapper's import"),
)  # fmt: skip
PUNICA_GUARDS = (
    Expect("vllm.platforms.interface", "Platform.get_punica_wrapper", "punica wrapper choice",
           params=("cls",)),
    Expect("vllm.platforms.cpu", "CpuPlatform.get_punica_wrapper", "CPU punica wrapper choice",
           params=("cls",)),
    Expect("vllm.platforms.cuda", "CudaPlatformBase.get_punica_wrapper",
           "CUDA punica wrapper choice", params=("cls",)),
    # What our wrappers (cpu_lora/, gpu_lora/) override, with vLLM's own call shapes.
    Expect(f"{_PUNICA}.punica_base", "PunicaWrapperBase.update_metadata", "our CPU wrapper",
           params=("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size")),
    Expect(f"{_PUNICA}.punica_cpu", "PunicaWrapperCPU.add_shrink", "our CPU wrapper",
           params=("self", "y", "x", "lora_a_stacked", "scale")),
    Expect(f"{_PUNICA}.punica_cpu", "PunicaWrapperCPU.add_expand", "our CPU wrapper",
           params=("self", "y", "x", "lora_b_stacked", "output_slices", "offset_start",
                   "add_inputs")),
    Expect(f"{_PUNICA}.punica_cpu", "PunicaWrapperCPU.add_lora_linear", "our CPU wrapper",
           params=_LORA_ARGS, keywords=("buffer",)),
    Expect(f"{_PUNICA}.punica_cpu", "PunicaWrapperCPU.add_lora_logits", "our CPU wrapper",
           params=("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale"),
           keywords=("buffer",)),
    Expect(f"{_PUNICA}.punica_cpu", "PunicaWrapperCPU.add_lora_embedding", "our CPU wrapper",
           params=("self", "y", "x", "lora_b_stacked", "add_inputs")),
    Expect(f"{_PUNICA}.punica_gpu", "PunicaWrapperGPU.update_metadata", "our GPU wrapper",
           params=("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size")),
    Expect(f"{_PUNICA}.punica_gpu", "PunicaWrapperGPU.add_lora_linear", "our GPU wrapper",
           params=_LORA_ARGS, keywords=("buffer",)),
)  # fmt: skip
SLOT_GUARDS = (
    Expect(_MANAGER, "LoRAModelManager.activate_adapter", "slot ranks and live ranks",
           params=("self", "lora_id"),
           contains=("if lora_id in self._active_adapters:\n return False",
                     "self.lora_index_to_id[index] = lora_model.id", "return True")),
    Expect(_MANAGER, "LoRAModelManager", "slot ranks and live ranks",
           assigns=("modules", "lora_index_to_id", "_registered_adapters",
                    "punica_wrapper_mapping")),
    Expect(_LINEAR, "BaseLinearLayerWithLoRA", "live ranks read the stacked weights",
           assigns=("lora_a_stacked", "lora_b_stacked")),
    Expect("vllm.lora.layers.base", "BaseLayerWithLoRA.set_mapping",
           "live ranks reach each module's punica wrapper", params=("self", "punica_wrapper"),
           assigns=("punica_wrapper",)),
    Expect(_LINEAR, "BaseLinearLayerWithLoRA._apply_lora_to_output",
           "live ranks: the wrapper gets the module's own stacked tuples",
           contains=("x, self.lora_a_stacked, self.lora_b_stacked",)),
)  # fmt: skip
GUARDS = (
    *CAPTURE_GUARDS, *LOAD_AHEAD_GUARDS, *SERVICE_LEVEL_GUARDS, *CPU_SHRINK_GUARDS,
    *PUNICA_GUARDS, *SLOT_GUARDS,
)  # fmt: skip


def apply(platform: Any, cpu_punica: str) -> None:
    """Every patch this platform needs (``current_platform``; ``cpu_punica``: the setting)."""
    patch_lora_layer_capture()
    patch_worker_lora_loading()
    patch_request_service_levels()
    if platform.is_cpu():
        patch_cpu_lora_shrink()
        select_cpu_punica_wrapper(type(platform))
        if cpu_punica == "ours":
            patch_cpu_live_ranks()
        if cpu_punica == "lora_kernels":
            # Before any module of lora_kernels is imported: @triton.jit reads it then.
            os.environ["TRITON_INTERPRET"] = "1"
            patch_slot_ranks()
    elif platform.is_cuda():
        select_gpu_punica_wrapper(type(platform))
        patch_slot_ranks()


def _wrap(owner: Any, name: str, marker: str, make: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make(original)`` once (``marker`` set on the replacement)."""
    original = getattr(owner, name)
    if getattr(original, marker, False):
        return
    patched = make(original)
    setattr(patched, marker, True)
    patched.__wrapped__ = original
    setattr(owner, name, patched)


def select_cpu_punica_wrapper(platform_cls: type) -> None:
    """Serve LoRA on CPU with our grouped wrapper unless ``VLLM_LORA_EXT_CPU_PUNICA=vllm``
    (``=lora_kernels``: our GPU path, interpreted, for tests)."""
    choices = {"ours": OUR_CPU_PUNICA, "lora_kernels": OUR_INTERPRETED_PUNICA}
    _select_punica_wrapper(platform_cls, lambda s: choices.get(s.cpu_punica))


def select_gpu_punica_wrapper(platform_cls: type) -> None:
    """On CUDA, ``VLLM_LORA_EXT_GPU_PUNICA=ours`` serves LoRA with :mod:`lora_kernels`; the
    default stays vLLM's Triton ops until our kernels have been measured on a GPU."""
    _select_punica_wrapper(
        platform_cls, lambda s: OUR_GPU_PUNICA if s.gpu_punica == "ours" else None
    )


def _select_punica_wrapper(platform_cls: type, choose: Callable[[Any], str | None]) -> None:
    """vLLM picks the wrapper by ``current_platform.get_punica_wrapper()`` (a qualname); the
    setting is read when the worker builds its LoRA manager, so one env var flips it."""
    original = platform_cls.get_punica_wrapper
    if getattr(original, "_vllm_lora_ext", False):
        return

    def get_punica_wrapper(cls) -> str:
        from vllm_lora_ext.settings import Settings

        return choose(Settings()) or original()

    get_punica_wrapper._vllm_lora_ext = True  # type: ignore[attr-defined]
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)


def patch_slot_ranks() -> None:
    """Tell the punica wrapper the rank of the adapter each slot holds, when vLLM fills it,
    and per module how many of those rows each slice holds.

    vLLM pads every slot to ``max_lora_rank`` and its wrappers never learn the real ranks; ours
    (``set_slot_rank``) then computes each slot with its own rank, and skips the slices and
    modules the adapter does not target (``note_live_ranks``: vLLM leaves them at zero).
    ``activate_adapter`` is where vLLM's LoRA manager writes an adapter into a slot
    (``lora_index_to_id[index]``; True only when it did).
    """
    from vllm.lora.model_manager import LoRAModelManager

    def make(original):
        def activate_adapter(self, lora_id: int) -> bool:
            result = original(self, lora_id)
            rank = self._registered_adapters[lora_id].rank
            index = self.lora_index_to_id.index(lora_id)
            for wrapper in self.punica_wrapper_mapping.values():
                if hasattr(wrapper, "set_slot_rank"):
                    wrapper.set_slot_rank(index, rank)
            for module in self.modules.values() if result else ():
                wrapper = getattr(module, "punica_wrapper", None)
                a = getattr(module, "lora_a_stacked", None)
                b = getattr(module, "lora_b_stacked", None)
                if hasattr(wrapper, "note_live_ranks") and isinstance(a, tuple | list):
                    wrapper.note_live_ranks(a, b, index)
            return result

        return activate_adapter

    _wrap(LoRAModelManager, "activate_adapter", "_vllm_lora_ext", make)


def patch_cpu_live_ranks() -> None:
    """When vLLM writes an adapter into a slot, note per module slice how many of the slot's
    rank rows are live (``segment_ops.note_live_ranks``): the grouped CPU path then skips the
    modules the adapter does not target and the padding up to ``--max-lora-rank``.

    vLLM allocates every slot for every LoRA-capable module at ``max_lora_rank`` and fills the
    rest with zeros; a rank-8 q/v adapter in a rank-16 slot of a Llama layer is 2 live slices of
    7, at half their rank. ``activate_adapter`` is where vLLM's LoRA manager fills a slot.
    """
    from vllm.lora.model_manager import LoRAModelManager

    from vllm_lora_ext.cpu_lora.segment_ops import note_live_ranks

    def make(original):
        def activate_adapter(self, lora_id: int) -> bool:
            result = original(self, lora_id)
            if result:  # False: already in a slot (vLLM calls this for every adapter every step)
                index = self.lora_index_to_id.index(lora_id)
                for module in self.modules.values():
                    a = getattr(module, "lora_a_stacked", None)
                    b = getattr(module, "lora_b_stacked", None)
                    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
                        note_live_ranks(a, b, index)
            return result

        return activate_adapter

    _wrap(LoRAModelManager, "activate_adapter", "_vllm_lora_ext_live", make)


def patch_cpu_lora_shrink() -> None:
    """Make vLLM's CPU LoRA ops leave base-model tokens (adapter index -1) untouched.

    vLLM 0.32's torch ops gather ``lora_a[indices]``; index -1 wraps to the *last* slot, so
    when every ``max_loras`` slot is occupied, base-model requests batched with adapter
    requests are served with the last slot's adapter. Zeroing the shrink output of those rows
    makes the following expand add ``B @ 0 = 0``. Idempotent; guarded by a test that tells
    us when vLLM's own op stops needing it.
    """
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    def make(original):
        def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
            original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
            output_tensor[lora_indices_tensor < 0] = 0

        return bgmv_shrink

    _wrap(lora_ops, "bgmv_shrink", "_vllm_lora_ext_masked", make)
    # sgmv_shrink (prefill) calls lora_ops.bgmv_shrink; the CPU wrapper calls its own import.
    punica_cpu.bgmv_shrink = lora_ops.bgmv_shrink


def patch_lora_layer_capture() -> None:
    """Hand every LoRA linear layer's input to the traffic capture (a no-op while none runs).

    ``_apply_lora_to_output`` is where vLLM's unsharded LoRA linear layers (column, merged
    qkv / gate-up, row, replicated) meet their input ``x`` and the batch's per-token adapter
    slots. Not reached by fully-sharded LoRA layers, the dual-stream CUDA path, or inside CUDA
    graphs: on GPU, capture needs ``--enforce-eager``.
    """
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from vllm_lora_ext.stats import capture_state

    def make(original):
        def _apply_lora_to_output(self, x, output):
            name = getattr(self, "_lora_ext_name", None)
            if name is not None:
                capture_state.observe(name, x, self.punica_wrapper.token_lora_indices)
            return original(self, x, output)

        return _apply_lora_to_output

    _wrap(BaseLinearLayerWithLoRA, "_apply_lora_to_output", "_vllm_lora_ext", make)


def patch_worker_lora_loading() -> None:
    """Let the engine step take an adapter the worker loaded ahead (``adapters/load_ahead``).

    ``WorkerLoRAManager._load_adapter`` is where vLLM reads an adapter's files, called by
    ``add_adapter`` for a batch's adapter missing from the CPU cache and by ``add_lora``.
    """
    from vllm.lora.worker_manager import WorkerLoRAManager

    def make(original):
        def _load_adapter(self, lora_request):
            path = lora_request.lora_path
            lora = worker.ahead_loader(self).take(path, lambda: original(self, lora_request))
            lora.id = lora_request.lora_int_id
            worker.AHEAD_PATHS[lora.id] = path
            return lora

        return _load_adapter

    _wrap(WorkerLoRAManager, "_load_adapter", "_vllm_lora_ext", make)


def patch_request_service_levels() -> None:
    """Observe each finished request's TTFT and time per output token under its adapter.

    ``OutputProcessor._update_stats_from_finished`` (API server process) is where a finished
    request's state still carries both its adapter name and vLLM's own timestamps, the ones
    behind ``vllm:time_to_first_token_seconds``.
    """
    from vllm.v1.engine.output_processor import OutputProcessor

    def make(original):
        def _update_stats_from_finished(self, req_state, finish_reason, iteration_stats):
            original(self, req_state, finish_reason, iteration_stats)
            stats = req_state.stats
            if stats is None or stats.num_generation_tokens == 0:
                return
            from vllm_lora_ext.server.service_levels import SERVICE_LEVELS

            n = stats.num_generation_tokens
            tpot = (stats.last_token_ts - stats.first_token_ts) / (n - 1) if n > 1 else None
            SERVICE_LEVELS.observe(req_state.lora_name, stats.first_token_latency, tpot)

        return _update_stats_from_finished

    _wrap(OutputProcessor, "_update_stats_from_finished", "_vllm_lora_ext", make)
