"""Sentence vectors for the semantic cache: which text is embedded, and how.

The cache embeds what distinguishes one question from another: the final user turn (earlier
turns are matched exactly, through the context hash). A long turn is embedded as the mean of
its head and its tail window, so two prompts sharing a long head but asking different things at
the end do not embed identically (the model reads only its first 256 tokens).

`Embed` is the one interface the cache needs: texts in, L2-normalised rows out, e.g. a
`router.embedding.Embedder` (all-MiniLM-L6-v2, int8 ONNX).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Embed = Callable[[list[str]], np.ndarray]

DIM = 384
WINDOW_WORDS = 150  # about 200 word pieces: inside the model's 256-token window
LONG_WORDS = 180  # longer turns are embedded as head + tail
BATCH = 64  # texts per model call (padding makes huge batches slow and memory-hungry)


def windows(text: str) -> list[str]:
    """The text itself, or its head and tail windows when it is long."""
    words = text.split()
    if len(words) <= LONG_WORDS:
        return [text]
    return [" ".join(words[:WINDOW_WORDS]), " ".join(words[-WINDOW_WORDS:])]


def cache_vectors(embed: Embed, texts: Sequence[str]) -> np.ndarray:
    """One normalised float32 vector per text (long texts: mean of head and tail)."""
    parts: list[str] = []
    owner: list[int] = []
    for index, text in enumerate(texts):
        for window in windows(text):
            parts.append(window)
            owner.append(index)
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    if not parts:
        return out
    order = sorted(range(len(parts)), key=lambda i: len(parts[i]))  # batches of like length
    rows = np.zeros((len(parts), DIM), dtype=np.float32)
    for start in range(0, len(order), BATCH):
        chosen = order[start:start + BATCH]
        rows[chosen] = np.asarray(embed([parts[i] for i in chosen]), dtype=np.float32)
    np.add.at(out, np.asarray(owner), rows)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def cache_vector(embed: Embed, text: str) -> np.ndarray:
    return cache_vectors(embed, [text])[0]
