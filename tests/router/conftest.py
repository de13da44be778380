"""Router test fixtures: the committed outcome fixtures, a fast stand-in embedder and a
small training recipe."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_FILES = sorted(FIXTURES.glob("outcomes_*.parquet"))
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "outcomes"

# What the tests that train through the CLI change in the production recipe: fewer trees and
# inner folds (everything else, the stacked parts and the lexical model included, as shipped).
# On the fixtures this trains in about a quarter of the time.
SMALL_RECIPE = {"max_iter": 30, "inner_folds": 2}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Native thread pools (the trees' OpenMP, the solvers' BLAS) limited to one thread. On a
    few hundred rows they have little to share out, and on a busy machine their threads spend
    far longer waiting for each other than working (a training run took ten times as long)."""
    import sklearn.ensemble  # noqa: F401  (loads the OpenMP runtime, so the limit reaches it)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with _one_thread():
        yield


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


def _small_recipe(patch) -> None:
    """Make the CLI (and cross-fitting) train with `SMALL_RECIPE` over the config it builds."""
    import router.evaluate
    import router.train

    fit = router.train.fit

    def small_fit(m, config=None):
        return fit(m, replace(config or router.train.TrainConfig(), **SMALL_RECIPE))

    patch.setattr(router.train, "fit", small_fit)
    patch.setattr(router.evaluate, "fit", small_fit)


@pytest.fixture
def small_recipe(monkeypatch):
    """Training through the CLI uses `SMALL_RECIPE`; returns it."""
    _small_recipe(monkeypatch)
    return SMALL_RECIPE


@pytest.fixture(scope="session")
def fixture_files() -> list[Path]:
    return FIXTURE_FILES


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """A bundle trained by the CLI on the committed fixtures (with the stand-in embedder and
    `SMALL_RECIPE`)."""
    import router.serving
    import router.train
    from router.cli import main

    out = tmp_path_factory.mktemp("bundle") / "b"
    with pytest.MonkeyPatch.context() as patch, _one_thread():
        patch.setattr(router.train, "Embedder", HashEmbedder)
        patch.setattr(router.serving, "_shared_embedder", lambda: HashEmbedder())
        _small_recipe(patch)
        cache = tmp_path_factory.mktemp("cache")
        args = ["train", "--data", *map(str, FIXTURE_FILES), "--out", str(out),
                "--version", "test", "--cache-dir", str(cache)]
        assert main(args) == 0
    return out
