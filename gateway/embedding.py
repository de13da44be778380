"""One prompt embedding per request, shared by the semantic cache and the learned router.

The embedder (all-MiniLM-L6-v2, int8 ONNX, `router.Embedder`) is built once, at start-up, by
the gateway's composition root and passed to the cache and the scorers. Vectors are
remembered by text in a small LRU, so when the cache has embedded a request's final user turn
the router's scorers reuse it instead of paying again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

Embed = Callable[[list[str]], np.ndarray]


class SharedEmbedding:
    """Texts in, L2-normalised rows out; thread-safe; remembers recent texts."""

    def __init__(self, factory: Callable[[], Embed] | None = None, remember: int = 4096,
                 threads: int = 1) -> None:
        self._factory = factory or (lambda: _embedder(threads))
        self._embed: Embed | None = None
        self._remember = remember
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.failure: str | None = None  # the last load or call's error, until one succeeds

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            known = {t: self._recent[t] for t in texts if t in self._recent}
            for text in known:
                self._recent.move_to_end(text)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            try:
                rows = np.asarray(self._model()(missing), dtype=np.float32)
            except Exception as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                raise
            self.failure = None
            fresh = dict(zip(missing, rows, strict=True))
            with self._lock:
                self._recent.update(fresh)
                while len(self._recent) > self._remember:
                    self._recent.popitem(last=False)
            known.update(fresh)
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def _model(self) -> Embed:
        with self._lock:
            if self._embed is None:
                self._embed = self._factory()
            return self._embed

    @property
    def vectors_id(self) -> str | None:
        """The model's `vectors_id` (names its vectors for disk caches); None when the
        factory's embedder has none. Loads the model."""
        return getattr(self._model(), "vectors_id", None)

    def warm(self) -> None:
        """Load the model now (a fraction of a second) rather than on the first request."""
        self._model()


def _embedder(threads: int) -> Embed:
    """All-MiniLM-L6-v2 with `threads` intra-op threads: 2 take about a fifth off a short query
    on an idle machine but compete with the event loop on a busy 2-core one."""
    from router import Embedder

    return Embedder(intra_op_threads=threads)
