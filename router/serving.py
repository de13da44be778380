"""The serving interface the gateway uses: load a bundle, score prompts and answers.

Scores are calibrated probabilities that the small model's answer is good enough; thresholds
live in the policy. Pass the request's shared prompt embedding (from `router.embedding`) to
stay within the scoring budget; without one the bundle embeds the prompt itself. All methods
are CPU-bound and thread-safe: call them from a worker thread, not the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from router.bundle import BundleError, read_bundle
from router.embedding import DIM, MODEL_ID, Embedder
from router.features import (
    ANSWER_FEATURES,
    FEATURE_NAMES,
    PROMPT_FEATURES,
    answer_features,
    consistency_features,
    logprob_features,
    prompt_features,
)
from router.models import StackedModel

__all__ = ["DEFAULT_BUNDLE", "RouterBundle"]

DEFAULT_BUNDLE = Path(__file__).parent / "bundles" / "default"
_N_PROMPT = len(PROMPT_FEATURES)
_FINAL_POS = ANSWER_FEATURES.index("a_final_pos")


@dataclass(frozen=True)
class _PromptInputs:
    """What both scorers need from one prompt (read-only: shared between threads)."""

    embedding: np.ndarray  # (1, DIM)
    row: np.ndarray  # hand-feature row: the prompt part, NaN elsewhere
    logits: np.ndarray  # the difficulty model's stacked logits
    difficulty: float


@dataclass(frozen=True)
class RouterBundle:
    """A verified, loaded model bundle with the two scorers the cascade needs."""

    path: Path
    digest: str
    metadata: dict
    difficulty_model: StackedModel
    confidence_model: StackedModel | None

    def __post_init__(self) -> None:
        # difficulty and then confidence score the same prompt: read it once per request
        object.__setattr__(self, "_inputs", lru_cache(maxsize=1024)(self._prompt_inputs))
        object.__setattr__(self, "_shared_logits", _same_prompt_parts(
            self.difficulty_model, self.confidence_model))

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
        if confidence is not None and _same_prompt_parts(difficulty, confidence):
            # trained together on the same logits: keep one copy of the prompt parts
            confidence = replace(confidence, linear=difficulty.linear, lexical=difficulty.lexical)
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
        return self._inputs(prompt, _embedding_key(embedding)).difficulty

    def confidence(
        self,
        prompt: str,
        answer: str,
        token_logprobs: list[float] | None = None,
        prompt_embedding: np.ndarray | None = None,
        top_logprobs: list[list[float]] | None = None,
        samples: list[str] | None = None,
    ) -> float:
        """P(this small answer is good enough); logprobs and `samples` (more answers of the small
        model to the same prompt, for self-consistency) are used if the bundle learned them."""
        if self.confidence_model is None:
            return self.difficulty(prompt, prompt_embedding)
        inputs = self._inputs(prompt, _embedding_key(prompt_embedding))
        answer_part = answer_features(prompt, answer)
        lp = logprob_features(token_logprobs, answer_part[_FINAL_POS], top_logprobs)
        sc = consistency_features(answer, samples)
        row = np.concatenate((inputs.row[:_N_PROMPT], answer_part, lp, sc))
        logits = inputs.logits if self._shared_logits else (
            self.confidence_model.stacked_logits(inputs.embedding, [prompt])[0])
        return self.confidence_model.predict_one(row, logits)

    def clear_cache(self) -> None:
        """Forget the prompts read so far (benchmarks time a new prompt on every request)."""
        self._inputs.cache_clear()

    def _prompt_inputs(self, prompt: str, embedding_key: bytes | None) -> _PromptInputs:
        if embedding_key is None:
            embedding = _shared_embedder().embed([prompt])
        else:
            embedding = np.frombuffer(embedding_key, dtype=np.float32).reshape(1, DIM)
        row = np.full(len(FEATURE_NAMES), np.nan)
        row[:_N_PROMPT] = prompt_features(prompt)
        row.flags.writeable = False
        logits = self.difficulty_model.stacked_logits(embedding, [prompt])[0]
        difficulty = self.difficulty_model.predict_one(row, logits)
        return _PromptInputs(embedding, row, logits, difficulty)


def _embedding_key(embedding: np.ndarray | None) -> bytes | None:
    """The request's prompt embedding as float32 bytes (hashable), checked for size."""
    if embedding is None:
        return None
    embedding = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
    if embedding.shape[1] != DIM:
        raise ValueError(f"embedding must have {DIM} dimensions, got {embedding.shape[1]}")
    return embedding.tobytes()


def _same_prompt_parts(a: StackedModel, b: StackedModel | None) -> bool:
    """Whether two models stack the same embedding and lexical logits."""
    if b is None:
        return False

    def same(x, y) -> bool:
        if x is None or y is None or x is y:
            return x is y
        return all(np.array_equal(getattr(x, f.name), getattr(y, f.name)) for f in fields(x))

    return same(a.linear, b.linear) and same(a.lexical, b.lexical)


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
