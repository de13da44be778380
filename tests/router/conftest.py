"""Router test fixtures: the committed outcome fixtures and a fast stand-in embedder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_FILES = sorted(FIXTURES.glob("outcomes_*.parquet"))
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "outcomes"


class HashEmbedder:
    """Deterministic stand-in for the ONNX embedder: unit vectors from word hashes."""

    vectors_id = "hash-stand-in"

    def __init__(self, intra_op_threads: int = 1) -> None:
        pass

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                digest = hashlib.sha256(word.encode()).digest()
                out[row, int.from_bytes(digest[:2], "big") % 384] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


@pytest.fixture
def fake_embedder(monkeypatch, tmp_path):
    """Route training and serving through HashEmbedder and an empty embedding cache."""
    import router.serving
    import router.train

    monkeypatch.setattr(router.train, "Embedder", HashEmbedder)
    monkeypatch.setattr(router.serving, "_shared_embedder", lambda: HashEmbedder())
    monkeypatch.setenv("SMALLFIRST_CACHE_DIR", str(tmp_path / "cache"))
    return HashEmbedder()


@pytest.fixture(scope="session")
def fixture_files() -> list[Path]:
    return FIXTURE_FILES


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """A bundle trained by the CLI on the committed fixtures (with the stand-in embedder)."""
    import router.serving
    import router.train
    from router.cli import main

    out = tmp_path_factory.mktemp("bundle") / "b"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(router.train, "Embedder", HashEmbedder)
        patch.setattr(router.serving, "_shared_embedder", lambda: HashEmbedder())
        cache = tmp_path_factory.mktemp("cache")
        args = ["train", "--data", *map(str, FIXTURE_FILES), "--out", str(out),
                "--version", "test", "--cache-dir", str(cache)]
        assert main(args) == 0
    return out
