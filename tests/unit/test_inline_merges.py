"""InlineMerges, the one owner of ``merge:`` models: parsing and checking, materialising into
the byte-bounded cache, touch, eviction (unloading from the engine first), and what goes when
a source adapter goes. A real store in a temporary folder, a fake engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_adapter_service import FakeEngine, adapter_dir, make_service, run

from vllm_lora_ext.adapters.lora_weights import load_lora
from vllm_lora_ext.errors import Refused
from vllm_lora_ext.server.adapters.inline_merges import is_merge, served_from


def _service(root: Path, **kw):
    engine = FakeEngine()
    service = make_service(root / "store", engine, **kw)
    for seed, name in enumerate("abc"):
        run(service.register_from_path(name, adapter_dir(root / name, seed=seed)))
    return service, engine


def test_the_prefix_and_what_a_loaded_model_is_served_from() -> None:
    assert is_merge("merge:a=1") and not is_merge("a") and not is_merge(None)
    assert served_from("merge:a=0.5,b=0.5", "a") and not served_from("merge:b=1", "a")
    assert served_from("a", "a") and not served_from("ab", "a")


def test_check_refuses_what_cannot_be_served_and_names_the_sources(tmp_path) -> None:
    service, _ = _service(tmp_path)
    spec, records = service.merges.check("merge:b=0.25,a=0.75")
    assert spec.terms == (("a", 0.75), ("b", 0.25))
    assert [r.name for r in records] == ["a", "b"]
    cases = {
        "merge:a=nan": (400, "non_finite"),
        "merge:a=1,nobody=1": (404, "unknown_adapter"),
        "merge:a=1,b=1,c=1": (400, "rank_too_high"),  # 24 > max rank 16
        "merge:a=": (400, "invalid_merge"),
    }
    for name, (status, reason) in cases.items():
        with pytest.raises(Refused) as refused:
            service.merges.check(name)
        assert (refused.value.status, refused.value.reason) == (status, reason), name
    off, _ = _service(tmp_path / "off", inline_merges=False)
    with pytest.raises(Refused, match="turned off"):
        off.merges.check("merge:a=1")


def test_materialise_builds_once_the_cat_merge_of_the_sources(tmp_path) -> None:
    """One folder per distinct merge (the order of the terms does not matter); its delta is
    the weighted sum of the sources' deltas, exactly (a cat merge)."""
    service, _ = _service(tmp_path)
    path = service.merges.materialise("merge:a=0.7,b=-0.3")
    assert service.merges.materialise("merge:b=-0.3,a=0.7") == path
    assert [e.path for e in service.merges.cache.entries()] == [path]
    merged = load_lora(path)
    a, b = (load_lora(service.store.path(n)) for n in "ab")
    assert merged.modules() == a.modules()
    for module in merged.modules():
        expected = 0.7 * a.delta(module) - 0.3 * b.delta(module)
        torch.testing.assert_close(merged.delta(module), expected, atol=1e-5, rtol=1e-5)


def test_eviction_unloads_the_least_recently_used_first_and_keeps_the_one_served(tmp_path):
    service, engine = _service(tmp_path, merged_cache_bytes=0)
    names = ["merge:a=1,b=1", "merge:a=1,c=1", "merge:b=1,c=1"]
    paths = [service.merges.materialise(n) for n in names]
    for n, p in zip(names, paths, strict=True):
        engine.loaded[n] = p
    service.merges.touch(names[0])  # a request for it: now the most recently used
    assert run(service.merges.evict(keep=paths[2].name)) == 2
    assert [e.path for e in service.merges.cache.entries()] == [paths[2]]
    assert {n for n in engine.loaded if is_merge(n)} == {names[2]}
    assert engine.calls[-2:] == [f"unload:{names[1]}", f"unload:{names[0]}"]


def test_a_deleted_source_takes_its_merges_with_it(tmp_path) -> None:
    service, engine = _service(tmp_path)
    kept = service.merges.materialise("merge:b=1,c=1")
    gone = service.merges.materialise("merge:a=1,b=1")
    engine.loaded |= {"merge:a=1,b=1": gone, "merge:b=1,c=1": kept}
    assert run(service.remove("a"))
    assert [e.path for e in service.merges.cache.entries()] == [kept]
    assert set(engine.loaded) == {"b", "c", "merge:b=1,c=1"}
    with pytest.raises(Refused, match="unknown adapter 'a'"):
        service.merges.materialise("merge:a=1,b=1")
