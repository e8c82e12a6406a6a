"""GGUF chunk assembly for models shipped in several PyPI packages (Gemma 3 270M)."""

from __future__ import annotations

import hashlib

import pytest

from vllm_lora_ext.base_models import ModelUnavailable, assemble_chunks


def test_chunks_are_concatenated_in_order_and_checked(tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 5000, b"\x00" * 3, b"tail"]  # first spans blocks
    chunks = []
    for i, data in enumerate(parts):
        (tmp_path / f"part{i:02d}").write_bytes(data)
        chunks.append(tmp_path / f"part{i:02d}")
    whole = b"".join(parts)
    out = assemble_chunks(chunks, tmp_path / "model.gguf", hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole


def test_wrong_checksum_leaves_no_file(tmp_path):
    for i, data in enumerate([b"ab", b"cd"]):
        (tmp_path / f"part{i}").write_bytes(data)
    reordered = [tmp_path / "part1", tmp_path / "part0"]
    with pytest.raises(ModelUnavailable, match="sha256"):
        assemble_chunks(reordered, tmp_path / "model.gguf", hashlib.sha256(b"abcd").hexdigest())
    assert not (tmp_path / "model.gguf").exists()
