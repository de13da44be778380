"""The serving interface the gateway uses: load a bundle, score prompts and answers.

Scores are calibrated probabilities that the small model's answer is good enough; thresholds
live in the policy. Pass the request's shared prompt embedding (from `router.embedding`) to
stay within the scoring budget; without one the bundle embeds the prompt itself. All methods
are CPU-bound and thread-safe: call them from a worker thread, not the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from router.bundle import BundleError, read_bundle
from router.embedding import DIM, MODEL_ID, Embedder
from router.features import (
    ANSWER_FEATURES,
    FEATURE_NAMES,
    LOGPROB_FEATURES,
    answer_features,
    logprob_features,
    prompt_features,
)
from router.models import StackedModel

__all__ = ["DEFAULT_BUNDLE", "RouterBundle"]

DEFAULT_BUNDLE = Path(__file__).parent / "bundles" / "default"
_N_PROMPT = len(FEATURE_NAMES) - len(ANSWER_FEATURES) - len(LOGPROB_FEATURES)
_FINAL_POS = ANSWER_FEATURES.index("a_final_pos")


@lru_cache(maxsize=2048)
def _prompt_part(prompt: str) -> tuple[float, ...]:
    # difficulty and then confidence score the same prompt: extract its features once
    return tuple(prompt_features(prompt))


@dataclass(frozen=True)
class RouterBundle:
    """A verified, loaded model bundle with the two scorers the cascade needs."""

    path: Path
    digest: str
    metadata: dict
    difficulty_model: StackedModel
    confidence_model: StackedModel | None

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BUNDLE, expected_digest: str | None = None):
        """Verify the bundle's manifest (optionally pinned by digest), then load it.

        `path` may be the word "default" for the bundle shipped in this package.
        """
        path = DEFAULT_BUNDLE if str(path) == "default" else Path(path)
        bundle = read_bundle(path, expected_digest)
        spec = bundle.metadata.get("feature_spec", {})
        if spec.get("embedding_model", MODEL_ID) != MODEL_ID:
            raise BundleError(f"{path}: trained on embedding {spec.get('embedding_model')!r}")
        names = spec.get("feature_names", list(FEATURE_NAMES))
        difficulty = _remap(bundle.difficulty, names, path)
        confidence = _remap(bundle.confidence, names, path) if bundle.confidence else None
        return cls(Path(path), bundle.digest, bundle.metadata, difficulty, confidence)

    @property
    def feature_set(self) -> dict:
        """Which feature groups each model was trained on (e.g. whether logprobs are used)."""
        return self.metadata.get("feature_spec", {}).get("feature_set", {})

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    def difficulty(self, prompt: str, embedding: np.ndarray | None = None) -> float:
        """P(the small model's answer will be good enough), from the prompt alone."""
        row = self._row(prompt)
        embedding = self._embedding(prompt, embedding)
        return float(self.difficulty_model.predict(row, embedding, [prompt])[0])

    def confidence(
        self,
        prompt: str,
        answer: str,
        token_logprobs: list[float] | None = None,
        prompt_embedding: np.ndarray | None = None,
        top_logprobs: list[list[float]] | None = None,
    ) -> float:
        """P(this small answer is good enough); logprobs are used if the bundle learned them."""
        if self.confidence_model is None:
            return self.difficulty(prompt, prompt_embedding)
        answer_part = answer_features(prompt, answer)
        lp = logprob_features(token_logprobs, answer_part[_FINAL_POS], top_logprobs)
        row = np.array([*_prompt_part(prompt), *answer_part, *lp], dtype=np.float64)
        embedding = self._embedding(prompt, prompt_embedding)
        return float(self.confidence_model.predict(row[None, :], embedding, [prompt])[0])

    def _row(self, prompt: str) -> np.ndarray:
        row = np.full((1, len(FEATURE_NAMES)), np.nan)
        row[0, :_N_PROMPT] = _prompt_part(prompt)
        return row

    def _embedding(self, prompt: str, embedding: np.ndarray | None) -> np.ndarray:
        if embedding is None:
            return _shared_embedder().embed([prompt])
        embedding = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        if embedding.shape[1] != DIM:
            raise ValueError(f"embedding must have {DIM} dimensions, got {embedding.shape[1]}")
        return embedding


def _remap(model: StackedModel, names: list[str], path) -> StackedModel:
    """Map the bundle's feature columns (by name) onto this code's feature order."""
    try:
        columns = [FEATURE_NAMES.index(names[c]) for c in model.columns]
    except (ValueError, IndexError) as exc:
        raise BundleError(f"{path}: a model uses a feature this code does not have") from exc
    return replace(model, columns=np.array(columns, dtype=np.int32))


_EMBEDDER: Embedder | None = None
_EMBEDDER_LOCK = threading.Lock()


def _shared_embedder() -> Embedder:
    global _EMBEDDER
    with _EMBEDDER_LOCK:
        if _EMBEDDER is None:
            _EMBEDDER = Embedder()
        return _EMBEDDER
