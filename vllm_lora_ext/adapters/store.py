"""An on-disk adapter store: one PEFT directory per name, written atomically, with lineage.

Layout: ``<root>/<name>/{adapter_config.json, adapter_model.safetensors, lineage.json}``.
An adapter is staged in ``<root>/.staging-*`` (same filesystem), validated there, then
renamed into place; a crash leaves at most a dot-directory that listing ignores and a later
start removes (staging only once stale: replicas may share the store). Removal renames to
``.trash-*`` first, so a half-deleted adapter is never listed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vllm_lora_ext.adapters.base_model import BaseModelInfo
from vllm_lora_ext.adapters.peft_format import WEIGHTS_FILE
from vllm_lora_ext.adapters.validation import (
    AdapterSummary,
    Refused,
    inspect_adapter_dir,
    validate_name,
)
from vllm_lora_ext.files import sha256_file

LINEAGE_FILE = "lineage.json"
STALE_STAGING_S = 3600.0
"""A staging directory this old is a crash's leftover. A younger one may be an upload in
progress on another replica that shares the store: a starting replica must not delete it."""


class StoredAdapter(AdapterSummary):
    """An adapter in the store: its summary plus where it came from."""

    name: str
    base: str
    created_at: float
    weights_sha256: str
    source: str


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*-*"):
            if leftover.name.startswith(".trash-") or (
                leftover.name.startswith(".staging-") and _age(leftover) > STALE_STAGING_S
            ):
                shutil.rmtree(leftover, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def list(self) -> list[StoredAdapter]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / LINEAGE_FILE).is_file():
                out.append(StoredAdapter.model_validate_json((d / LINEAGE_FILE).read_text()))
        return out

    def get(self, name: str) -> StoredAdapter | None:
        lineage = self.path(name) / LINEAGE_FILE
        if not lineage.is_file():
            return None
        return StoredAdapter.model_validate_json(lineage.read_text())

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch directory beside the store, removed unless :meth:`commit` moved it."""
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(
        self, staged: Path, name: str, base: BaseModelInfo, max_rank: int, source: str
    ) -> StoredAdapter:
        """Validate ``staged`` against ``base`` and move it into the store as ``name``."""
        target = self.path(name)
        if target.exists():
            raise Refused("duplicate_name", f"adapter {name!r} already exists", 409)
        summary = inspect_adapter_dir(staged, base, max_rank)
        record = StoredAdapter(
            **summary.model_dump(),
            name=name,
            base=base.name,
            created_at=time.time(),
            weights_sha256=sha256_file(staged / WEIGHTS_FILE),
            source=source,
        )
        _write_durably(staged / LINEAGE_FILE, record.model_dump_json(indent=2).encode())
        try:
            os.rename(staged, target)  # atomic; fails if a racing writer got there first
        except OSError as e:
            raise Refused("duplicate_name", f"adapter {name!r} already exists", 409) from e
        _fsync_dir(self.root)
        return record

    def remove(self, name: str) -> bool:
        target = self.path(name)
        if not target.is_dir():
            return False
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
        os.rename(target, trash / name)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return True


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:  # removed by another replica meanwhile
        return 0.0
