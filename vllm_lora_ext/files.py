"""Whole-or-absent file writes and file checksums, shared by the store, caches and jobs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_directory(staging: Path, target: Path) -> Path:
    """Move the finished folder ``staging`` to ``target`` (same parent folder). An existing
    ``target`` is renamed aside first and removed afterwards: ``target`` is never a half-written
    folder, and a crash between the two renames leaves the old one aside, not lost."""
    staging, target = Path(staging), Path(target)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
        target.rename(aside / target.name)
    staging.rename(target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A scratch folder beside ``target`` to fill; when the block ends without an error it
    replaces ``target`` (:func:`replace_directory`), otherwise it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
