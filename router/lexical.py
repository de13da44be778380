"""A lexical view of the prompt: hashed word uni- and bigrams, no vocabulary to store.

Words are hashed (crc32) into `BUCKETS` slots; counts are log-scaled, weighted by inverse
document frequency and L2-normalised (TF-IDF without a vocabulary). A logistic regression over
that vector becomes one more stacked input, next to the embedding's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from zlib import crc32

import numpy as np

__all__ = ["BUCKETS", "LexicalPart", "fit_idf", "hashed", "matrix", "weigh"]

BUCKETS = 1 << 18
_TOKEN = re.compile(r"\w\w+")  # maximal runs: the same words as \b\w\w+\b


@lru_cache(maxsize=1024)  # difficulty and then confidence hash the same prompt
def hashed(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, 1 + log count) of a text's word uni- and bigrams (do not modify)."""
    words = _TOKEN.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    grams = words + list(map(" ".join, zip(words, words[1:], strict=False)))
    crcs = np.fromiter(map(crc32, map(str.encode, grams)), dtype=np.uint32, count=len(grams))
    buckets = crcs & (BUCKETS - 1)
    index, counts = np.unique(buckets.astype(np.int32), return_counts=True)
    return index, 1.0 + np.log(counts.astype(np.float32))


def matrix(texts: list[str]):
    """Sparse (n, BUCKETS) matrix of `hashed` rows, before IDF weighting (for training)."""
    from scipy.sparse import csr_matrix

    parts = [hashed(t) for t in texts]
    indptr = np.concatenate([[0], np.cumsum([len(i) for i, _ in parts])])
    index = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int32)
    values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.float32)
    return csr_matrix((values, index, indptr), shape=(len(texts), BUCKETS))


def fit_idf(tf) -> np.ndarray:
    """Smoothed inverse document frequency per bucket, from a `matrix` of training texts."""
    df = np.asarray((tf > 0).sum(axis=0)).ravel()
    return (np.log((1.0 + tf.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)


def weigh(tf, idf: np.ndarray):
    """IDF-weighted, row-normalised copy of a `matrix` (the training-side `LexicalPart` input)."""
    from scipy.sparse import diags
    from sklearn.preprocessing import normalize

    return normalize(tf @ diags(idf))


@dataclass(frozen=True)
class LexicalPart:
    """Logistic-regression logit over the IDF-weighted hashed n-gram vector."""

    weights: np.ndarray  # (BUCKETS,) float32
    intercept: float
    idf: np.ndarray  # (BUCKETS,) float32

    def logit(self, texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts))
        for row, text in enumerate(texts):
            index, tf = hashed(text)
            values = tf * self.idf[index]
            norm = float(np.linalg.norm(values))
            dot = float(self.weights[index] @ values) / norm if norm else 0.0
            out[row] = dot + self.intercept
        return out

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}weights": self.weights.astype(np.float16),
                f"{prefix}idf": self.idf.astype(np.float16),
                f"{prefix}intercept": np.array([self.intercept])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> LexicalPart:
        weights = arrays[f"{prefix}weights"].astype(np.float32)
        idf = arrays[f"{prefix}idf"].astype(np.float32)
        if weights.shape != (BUCKETS,) or idf.shape != (BUCKETS,):
            raise ValueError("lexical arrays have the wrong shape")
        return cls(weights, float(arrays[f"{prefix}intercept"][0]), idf)
