"""Fixtures for the migration tests: one torch thread, a second tiny model (another tokenizer
and architecture)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import build_tiny_gemma3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models train ~15x faster on one thread when other jobs share the two cores."""


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("models") / "tiny-gemma3")
