"""Fixtures for the model cache tests: an empty cache per test and a tiny GGUF per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.models.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty specsplit cache, selected through $SPECSPLIT_CACHE."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECSPLIT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Llama GGUF file and the float32 tensors written into it."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)
