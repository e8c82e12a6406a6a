"""The adapter store: all-or-nothing commits, lineage, crash leftovers ignored and cleaned."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_validation import BASE
from tiny_model import random_lora_tensors, write_adapter

from vllm_lora_ext.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from vllm_lora_ext.adapters.store import LINEAGE_FILE, STALE_STAGING_S, AdapterStore
from vllm_lora_ext.errors import Refused


def add(store: AdapterStore, name: str, seed: int = 0, **kw) -> None:
    with store.staging() as staged:
        write_adapter(staged, random_lora_tensors(seed, **kw), base="tiny", **kw)
        store.commit(staged, name, BASE, max_rank=16, source="test")


def test_commit_records_lineage(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    add(store, "a")
    record = store.get("a")
    assert record is not None
    assert record.base == "tiny" and record.declared_base == "tiny" and record.rank == 8
    assert len(record.weights_sha256) == 64
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, LINEAGE_FILE]
    )
    assert [a.name for a in store.list()] == ["a"]


def test_rejected_commit_leaves_nothing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(Refused), store.staging() as staged:
        write_adapter(staged, random_lora_tensors(0, rank=32), base="tiny", rank=32)
        store.commit(staged, "big", BASE, max_rank=16, source="test")
    assert list(tmp_path.iterdir()) == []


def test_duplicate_refused_and_original_kept(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    add(store, "a", seed=1)
    sha = store.get("a").weights_sha256
    with pytest.raises(Refused) as e:
        add(store, "a", seed=2)
    assert e.value.reason == "duplicate_name" and e.value.status == 409
    assert store.get("a").weights_sha256 == sha
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".staging-abc").mkdir()
    (tmp_path / ".staging-abc" / CONFIG_FILE).write_text("{}")
    old = time.time() - STALE_STAGING_S - 1
    os.utime(tmp_path / ".staging-abc", (old, old))
    (tmp_path / ".staging-new").mkdir()  # another replica's upload in progress: kept
    (tmp_path / ".trash-xyz").mkdir()
    (tmp_path / "half-written").mkdir()  # no lineage: never listed
    store = AdapterStore(tmp_path)
    assert store.list() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-new", "half-written"]


def test_remove(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    add(store, "a")
    assert store.remove("a") is True
    assert store.remove("a") is False
    assert store.get("a") is None and list(tmp_path.iterdir()) == []


def test_path_refuses_traversal(tmp_path: Path) -> None:
    with pytest.raises(Refused):
        AdapterStore(tmp_path).path("../etc")
