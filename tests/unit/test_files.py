"""Whole-or-absent writes: a folder replaced by a finished staging folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_lora_ext.files import replace_directory, staged_directory


def folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def test_replace_directory_swaps_in_the_new_folder_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    target = folder(tmp_path / "adapter", {"old.txt": "old", "shared.txt": "old"})
    staging = folder(tmp_path / ".staging-x", {"shared.txt": "new"})
    assert replace_directory(staging, target) == target
    assert contents(target) == {"shared.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    fresh = folder(tmp_path / ".staging-y", {"a.txt": "a"})  # no folder there yet
    replace_directory(fresh, tmp_path / "other")
    assert contents(tmp_path / "other") == {"a.txt": "a"}


def test_a_failed_move_keeps_the_old_folder_aside_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the two renames (simulated: the second one fails) leaves the old folder
    under a hidden name beside the target, with all its files."""
    target = folder(tmp_path / "adapter", {"weights": "old"})
    staging = folder(tmp_path / ".staging-x", {"weights": "new"})
    real_rename = Path.rename

    def failing(self: Path, dest: Path) -> Path:
        if self == staging:
            raise OSError("disk gone")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        replace_directory(staging, target)
    (aside,) = tmp_path.glob(".adapter.replaced-*/adapter")
    assert contents(aside) == {"weights": "old"} and not target.exists()


def test_staged_directory_replaces_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = folder(tmp_path / "adapter", {"weights": "old"})
    with pytest.raises(RuntimeError, match="half way"), staged_directory(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("half way")
    assert contents(target) == {"weights": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with staged_directory(target) as staging:
        (staging / "weights").write_text("new")
    assert contents(target) == {"weights": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
