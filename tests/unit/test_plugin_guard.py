"""Fails loudly when vLLM moves what ``vllm_lora_ext/vllm_boundary/`` relies on: the guards
(the same data start-up checks) against the installed vLLM, the guards' own check on altered
sources, and the patches' behaviour on vLLM's real classes."""

from __future__ import annotations

import inspect
from importlib import metadata

import pytest
import torch

from vllm_lora_ext import vllm_boundary
from vllm_lora_ext.vllm_boundary import entry, patches, worker
from vllm_lora_ext.vllm_boundary.guards import Expect, VllmIncompatible, check, require


def test_vllm_is_the_pinned_release() -> None:
    import vllm

    assert vllm.__version__ == vllm_boundary.SUPPORTED_VLLM_VERSION


def test_every_guard_holds_on_the_installed_vllm() -> None:
    guards = entry.every_guard()
    assert len(guards) > 40 and len({g.where for g in guards}) > 30
    assert check(guards) == []


_SOURCE = """
from x import imported_name
LIMIT: int = 3

class Manager:
    count: int
    name: str

    def __init__(self, a, b=1, *, internal=False):
        self.slots = []
        self.table: dict = {}
        if a:
            return False

    @property
    def size(self):
        return 1

    async def load(self, request, base=None):
        return x, self.slots, self.table
"""


@pytest.mark.parametrize(
    ("expect", "problems"),
    [
        (Expect("m", "Manager.__init__", "w", params=("self", "a", "b"), keywords=("internal",),
                assigns=("slots", "table"), contains=("if a:\n   return False",)), []),
        (Expect("m", "Manager.load", "w", accepts=("self", "request"), is_async=True), []),
        (Expect("m", "Manager", "w", fields=("count", "name"), assigns=("slots",)), []),
        (Expect("m", "Manager.size", "w", is_property=True), []),
        (Expect("m", "imported_name", "w"), []),
        (Expect("m", "LIMIT", "w"), []),
        (Expect("m", "", "w", contains=("class Manager:",)), []),
        (Expect("m", "Manager.gone", "w"), ["m.Manager.gone: not defined (w)"]),
        (Expect("m", "Manager.load", "w", params=("self", "request")),
         ["m.Manager.load: positional parameters ('self', 'request', 'base'), expected "
          "('self', 'request') (w)"]),
        (Expect("m", "Manager.__init__", "w", accepts=("self",)),
         ["m.Manager.__init__: positional parameters ('self', 'a', 'b') (1 with defaults), "
          "called as ('self',) (w)"]),
        (Expect("m", "Manager.__init__", "w", keywords=("timeout",), is_async=True),
         ["m.Manager.__init__: no parameter timeout (w)", "m.Manager.__init__: is not async (w)"]),
        (Expect("m", "Manager.__init__", "w", assigns=("slots", "lora")),
         ["m.Manager.__init__: assigns no self.lora (w)"]),
        (Expect("m", "Manager", "w", fields=("name", "count")),
         ["m.Manager: fields ['count', 'name'], expected ('name', 'count') (w)"]),
        (Expect("m", "Manager.load", "w", contains=("self.table, self.slots",)),
         ["m.Manager.load: no longer contains 'self.table, self.slots' (w)"]),
        (Expect("m", "Manager.load", "w", is_property=True),
         ["m.Manager.load: is not a property (w)"]),
        (Expect("gone", "f", "w"), ["gone.f: module gone not found (w)"]),
    ],
)  # fmt: skip
def test_a_guard_names_each_thing_that_changed(expect: Expect, problems: list[str]) -> None:
    assert check([expect], {"m": _SOURCE}.get) == problems


def test_start_up_refuses_a_vllm_without_what_the_patches_need(monkeypatch) -> None:
    """register() raises (vLLM runs general plugins unguarded: the process stops) and names
    every mismatch; nothing is patched."""
    import vllm

    gone = Expect("vllm.lora.model_manager", "LoRAModelManager.gone_in_next", "a test")
    with pytest.raises(VllmIncompatible) as raised:
        require([gone, *patches.SLOT_GUARDS], vllm.__version__)
    assert str(raised.value).splitlines()[1:] == [
        "  vllm.lora.model_manager.LoRAModelManager.gone_in_next: not defined (a test)"
    ]
    monkeypatch.setattr(patches, "GUARDS", (gone,))
    monkeypatch.setattr(entry, "_registered", False)
    applied: list[object] = []
    monkeypatch.setattr(patches, "apply", lambda *a: applied.append(a))
    with pytest.raises(VllmIncompatible, match="gone_in_next"):
        entry.register()
    assert applied == [] and entry._registered is False


def test_entry_points_are_installed() -> None:
    groups = {
        g: {ep.name: ep.value for ep in metadata.entry_points(group=g)}
        for g in ("vllm.general_plugins", "vllm.endpoint_plugins")
    }
    assert groups["vllm.general_plugins"]["lora_ext"] == (
        "vllm_lora_ext.vllm_boundary.entry:register"
    )
    assert groups["vllm.endpoint_plugins"]["lora_ext"] == (
        "vllm_lora_ext.vllm_boundary.entry:LoraExtEndpointPlugin"
    )


def test_endpoint_plugin_matches_vllm_protocol() -> None:
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    assert isinstance(entry.LoraExtEndpointPlugin(), EndpointPlugin)


def test_serving_models_interface_we_use() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.lora.protocol import (
        LoadLoRAAdapterRequest,
        UnloadLoRAAdapterRequest,
    )
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    for method in ("load_lora_adapter", "unload_lora_adapter", "resolve_lora"):
        assert inspect.iscoroutinefunction(getattr(OpenAIServingModels, method))
    init_src = inspect.getsource(OpenAIServingModels.__init__)
    assert "self.lora_requests" in init_src and "self.lora_resolvers" in init_src
    assert {"lora_name", "lora_path"} <= set(LoadLoRAAdapterRequest.model_fields)
    assert "lora_name" in UnloadLoRAAdapterRequest.model_fields
    request = LoRARequest("x", 1, "/adapters/x")  # positional, as the resolver builds it
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("x", 1, "/adapters/x")
    assert "resolve_lora" in LoRAResolver.__abstractmethods__


def test_engine_internals_unload_relies_on() -> None:
    """VllmEngineAdapters.unload: the resolver lock, the engine's request states, abort."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState

    assert "self.lora_resolver_lock" in inspect.getsource(OpenAIServingModels.__init__)
    assert "self.output_processor = OutputProcessor(" in inspect.getsource(AsyncLLM.__init__)
    assert "self.request_states" in inspect.getsource(OutputProcessor.__init__)
    assert "self.lora_request = lora_request" in inspect.getsource(RequestState.__init__)
    assert "internal" in inspect.signature(AsyncLLM.abort).parameters
    assert inspect.iscoroutinefunction(AsyncLLM.remove_lora)


def test_server_entry_module_exists() -> None:
    from vllm.entrypoints.launchers.api_server import entry

    assert callable(entry.main)


def _shrink_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    lora_a = torch.randn(2, 1, 4, 8, generator=g)  # [max_loras, 1, rank, hidden]: slots full
    indices = torch.tensor([0, -1, 1])
    return x, lora_a, indices


def test_vllm_cpu_shrink_still_misroutes_base_tokens() -> None:
    """vLLM's op applies the last slot to index -1; when this fails, drop our patch."""
    from vllm.lora.ops.torch_ops import lora_ops

    original = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    x, lora_a, indices = _shrink_case()
    out = torch.zeros(3, 4)
    original(x, lora_a, out, indices, 1.0)
    torch.testing.assert_close(out[1], x[1] @ lora_a[1, 0].T)  # the bug: base token got slot 1


def test_patched_shrink_leaves_base_tokens_untouched() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    patches.patch_cpu_lora_shrink()
    patches.patch_cpu_lora_shrink()  # idempotent
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink
    x, lora_a, indices = _shrink_case()
    out = torch.full((3, 4), float("nan"))
    lora_ops.bgmv_shrink(x, lora_a, out, indices, 0.5)
    ref = torch.stack([x[0] @ lora_a[0, 0].T, torch.zeros(4), x[2] @ lora_a[1, 0].T]) * 0.5
    ref[1] = 0
    torch.testing.assert_close(out, ref)
    # prefill path: sgmv_shrink explodes per-sequence indices and calls the patched op
    out = torch.full((3, 4), float("nan"))
    lora_ops.sgmv_shrink(
        x, lora_a, out, None, torch.tensor([2, 1]), torch.tensor([-1, 1]), 2, 2, 3, 1.0
    )
    torch.testing.assert_close(out[:2], torch.zeros(2, 4))
    torch.testing.assert_close(out[2], x[2] @ lora_a[1, 0].T)


def test_cpu_punica_wrapper_selection(monkeypatch) -> None:
    from vllm.platforms import current_platform

    entry.register()
    monkeypatch.delenv("VLLM_LORA_EXT_CPU_PUNICA", raising=False)
    assert current_platform.get_punica_wrapper() == patches.OUR_CPU_PUNICA
    monkeypatch.setenv("VLLM_LORA_EXT_CPU_PUNICA", "vllm")
    assert current_platform.get_punica_wrapper() == (
        "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    )


def test_our_wrapper_overrides_match_vllm_signatures() -> None:
    """If vLLM changes what its LoRA layers call, our overrides must change with it."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_lora_ext.cpu_lora.punica_wrapper import GroupedPunicaWrapperCPU

    for method in (
        "update_metadata",
        "add_shrink",
        "add_expand",
        "add_lora_linear",
        "add_lora_logits",
        "add_lora_embedding",
    ):
        ours = inspect.signature(getattr(GroupedPunicaWrapperCPU, method))
        theirs = inspect.signature(getattr(PunicaWrapperCPU, method))
        positional = [
            p.name
            for p in theirs.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        assert [
            p.name
            for p in ours.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ] == positional, method


def test_capture_hook_point_and_worker_internals_exist() -> None:
    """The capture patches ``_apply_lora_to_output(self, x, output)`` and reads the worker's
    LoRA manager (``modules``, ``lora_index_to_id``) and the wrapper's ``token_lora_indices``."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    patches.patch_lora_layer_capture()
    patched = BaseLinearLayerWithLoRA._apply_lora_to_output
    assert patched._vllm_lora_ext
    assert list(inspect.signature(patched.__wrapped__).parameters) == ["self", "x", "output"]
    init = inspect.getsource(LoRAModelManager.__init__)
    assert "self.modules" in init and "self.lora_index_to_id" in init
    assert isinstance(PunicaWrapperBase.token_lora_indices, property)
    assert "worker_extension_cls" in inspect.getsource(WorkerWrapperBase)
    for layer in ("ColumnParallelLinearWithLoRA", "RowParallelLinearWithLoRA"):
        import vllm.lora.layers as layers

        assert issubclass(getattr(layers, layer), BaseLinearLayerWithLoRA)
    patches.patch_lora_layer_capture()  # idempotent
    assert BaseLinearLayerWithLoRA._apply_lora_to_output is patched


def test_gpu_punica_wrapper_selection(monkeypatch) -> None:
    """The CUDA platform cannot be imported on a CPU build: check the switch on a stand-in with
    the same classmethod, and that the qualname it names resolves."""
    import importlib

    class FakeCuda:
        @classmethod
        def get_punica_wrapper(cls) -> str:
            return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"

    patches.select_gpu_punica_wrapper(FakeCuda)
    monkeypatch.delenv("VLLM_LORA_EXT_GPU_PUNICA", raising=False)
    assert FakeCuda.get_punica_wrapper().endswith("PunicaWrapperGPU")
    assert "lora_ext" not in FakeCuda.get_punica_wrapper()  # vLLM's ops by default
    monkeypatch.setenv("VLLM_LORA_EXT_GPU_PUNICA", "ours")
    assert FakeCuda.get_punica_wrapper() == patches.OUR_GPU_PUNICA
    module, _, name = patches.OUR_GPU_PUNICA.rpartition(".")
    assert hasattr(importlib.import_module(module), name)


def test_cpu_cache_pinning_we_use() -> None:
    """worker.pin_in_cpu_cache pins in the worker's LRU of loaded adapters, and not through
    vLLM's pin_lora, which also takes a batch slot: when that changes, reconsider."""
    from vllm.lora.model_manager import LoRAModelManager, LRUCacheLoRAModelManager
    from vllm.utils.cache import LRUCache
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    assert "self._registered_adapters" in inspect.getsource(LoRAModelManager.__init__)
    assert "_pin_lora_in_gpu_cache" in inspect.getsource(LRUCacheLoRAModelManager.pin_adapter)
    assert "self.lora_manager" in inspect.getsource(LoRAModelRunnerMixin)
    for method in ("add_lora", "list_loras"):
        assert inspect.iscoroutinefunction(getattr(AsyncLLM, method))
    cache: LRUCache[int, str] = LRUCache(2)
    cache.put(1, "pinned")
    cache.put(2, "b")
    cache.pin(1)
    cache.put(3, "c")  # evicts the least recently used unpinned entry
    assert 1 in cache and 2 not in cache and 3 in cache


def test_slot_ranks_reach_the_wrapper_when_vllm_fills_a_slot() -> None:
    """vLLM's own ``activate_adapter`` (patched, then run on a stand-in manager with no layers)
    picks the first free slot; our wrapper hears which rank went there."""
    from types import SimpleNamespace

    from vllm.lora.model_manager import LoRAModelManager

    patches.patch_slot_ranks()
    patches.patch_slot_ranks()  # idempotent
    heard: list[tuple[int, int]] = []
    wrapper = SimpleNamespace(set_slot_rank=lambda i, r: heard.append((i, r)))
    manager = SimpleNamespace(
        _active_adapters={}, lora_index_to_id=[3, None, None], modules={},
        _registered_adapters={7: SimpleNamespace(id=7, rank=4)},
        punica_wrapper_mapping={"language_model": wrapper, "tower": SimpleNamespace()},
    )  # fmt: skip
    assert LoRAModelManager.activate_adapter(manager, 7) is True
    assert manager.lora_index_to_id == [3, 7, None] and heard == [(1, 4)]


def test_load_ahead_and_service_level_hook_points_exist() -> None:
    """Loads ahead replace the body of ``_load_adapter`` (called by ``add_adapter`` in the step);
    per-adapter TTFT/TPOT read a finished request's name and vLLM's timestamps."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState
    from vllm.v1.metrics.stats import RequestStateStats

    patches.patch_worker_lora_loading()
    patches.patch_request_service_levels()
    load = WorkerLoRAManager._load_adapter
    assert load._vllm_lora_ext
    assert list(inspect.signature(load.__wrapped__).parameters) == ["self", "lora_request"]
    assert "self._load_adapter(lora_request)" in inspect.getsource(
        LRUCacheWorkerLoRAManager.add_adapter
    )
    assert "self.id = lora_model_id" in inspect.getsource(LoRAModel.__init__)
    finished = OutputProcessor._update_stats_from_finished
    assert finished._vllm_lora_ext
    assert list(inspect.signature(finished.__wrapped__).parameters) == [
        "self", "req_state", "finish_reason", "iteration_stats"
    ]  # fmt: skip
    assert "self.lora_name = " in inspect.getsource(RequestState.__init__)
    fields = RequestStateStats.__dataclass_fields__
    assert {
        "first_token_latency",
        "first_token_ts",
        "last_token_ts",
        "num_generation_tokens",
    } <= set(fields)


def test_live_rank_hook_point_exists() -> None:
    """vLLM fills a slot in ``activate_adapter`` (True only when it did) and keeps the stacked
    weights as tuples on the module, the same tensors its punica wrapper is handed."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager

    patches.patch_cpu_live_ranks()
    patched = LoRAModelManager.activate_adapter
    assert patched._vllm_lora_ext_live
    original = patched.__wrapped__
    while getattr(original, "__wrapped__", None) is not None:  # other patches of ours
        original = original.__wrapped__
    source = inspect.getsource(original)
    assert "if lora_id in self._active_adapters:\n            return False" in source
    assert "self.lora_index_to_id[index] = lora_model.id" in source
    apply = inspect.getsource(inspect.unwrap(BaseLinearLayerWithLoRA._apply_lora_to_output))
    assert "x, self.lora_a_stacked, self.lora_b_stacked" in apply


def test_the_worker_extension_serves_every_call_of_the_api_side() -> None:
    """``serve`` names the extension by path; each ``collective_rpc`` method the bridge calls
    is one of its methods."""
    import importlib
    import re

    from vllm_lora_ext.vllm_boundary.api import engine

    module, _, name = vllm_boundary.WORKER_EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is worker.LoraExtWorkerExtension
    called = set(re.findall(r'"(lora_ext_\w+)"', inspect.getsource(engine)))
    assert len(called) >= 8
    missing = [m for m in called if not callable(getattr(worker.LoraExtWorkerExtension, m, None))]
    assert not missing
