"""The on-disk cache of inline merges (``<store>/.merged/<key>/``), bounded in bytes.

Every distinct ``merge:a=w,...`` a client requests is built once into a PEFT folder that vLLM
loads. Without a bound, any client allowed to send a completion could fill the disk by varying
a weight. Entries carry their sources in ``recipe.json``, so the entries built from an adapter go
with it when it is deleted or replaced; beyond the byte budget the least recently used go first.
This module only handles files; unloading an entry from vLLM before its files go is the
service's job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_lora_ext.adapters.recipe import RECIPE_FILE, RECIPE_FORMAT, RECIPE_VERSION

MERGED_DIR = ".merged"


@dataclass(frozen=True)
class MergedEntry:
    key: str
    path: Path
    sources: frozenset[str]
    size_bytes: int
    last_used: float


class MergedCache:
    def __init__(self, store_root: Path, budget_bytes: int) -> None:
        self.root = Path(store_root) / MERGED_DIR
        self.budget_bytes = budget_bytes
        self._used: dict[str, float] = {}
        """Last use seen by this process (a served request); the folder's mtime otherwise."""

    def path(self, key: str) -> Path:
        return self.root / key

    def hit(self, key: str) -> Path | None:
        """The entry's folder, marked as used now; None if it is not built."""
        target = self.path(key)
        if not target.is_dir():
            return None
        self.touch(key)
        return target

    def touch(self, key: str) -> None:
        self._used[key] = time.time()

    def recipe(self, sources: list[tuple[str, float, str]]) -> dict:
        """``recipe.json`` of an entry: ``sources`` are (name, weight, weights sha256)."""
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "method": "cat",
            "sources": [{"name": n, "weight": w, "sha256": s} for n, w, s in sources],
        }

    def commit(self, staged: Path, key: str, recipe: dict) -> Path:
        """Move a built, validated entry into place (a concurrent build of it may win)."""
        (staged / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        self.root.mkdir(exist_ok=True)
        target = self.path(key)
        with contextlib.suppress(OSError):  # another request (or replica) built it first
            os.rename(staged, target)
        self.touch(key)
        return target

    def entries(self) -> list[MergedEntry]:
        out = []
        for d in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            try:
                recipe = json.loads((d / RECIPE_FILE).read_text())
                sources = frozenset(s["name"] for s in recipe["sources"])
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                mtime = d.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError):
                sources, size, mtime = frozenset(), _size(d), 0.0  # unreadable: first to go
            out.append(MergedEntry(d.name, d, sources, size, self._used.get(d.name, mtime)))
        return out

    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def over_budget(self, keep: str | None = None) -> list[MergedEntry]:
        """Least recently used entries to drop so the rest fits the budget (``keep`` stays)."""
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size_bytes for e in entries)
        victims = []
        for entry in entries:
            if total <= self.budget_bytes:
                break
            if entry.key == keep:
                continue
            victims.append(entry)
            total -= entry.size_bytes
        return victims

    def built_from(self, name: str) -> list[MergedEntry]:
        return [e for e in self.entries() if name in e.sources]

    def remove(self, entry: MergedEntry) -> None:
        """Rename away first (no half-deleted entry is ever loaded), then delete."""
        self._used.pop(entry.key, None)
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
        with contextlib.suppress(OSError):  # gone already (another replica)
            os.rename(entry.path, trash / entry.key)
        shutil.rmtree(trash, ignore_errors=True)


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
