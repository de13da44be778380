"""Training data: labelled outcome rows, their fingerprint, and a disk cache of embeddings.

Rows follow the outcomes schema (one row per prompt: `prompt`, `small_response`,
`small_score`, `large_score`, ...). Logged gateway traffic turned into rows in the same schema
(plus optional `small_logprobs`, a list of token logprobs, and `small_samples`, more answers of
the small model to the same prompt) trains through the same code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "REQUIRED_COLUMNS",
    "EmbeddingCache",
    "add_peer_samples",
    "default_cache_dir",
    "fingerprint",
    "load_outcomes",
]

REQUIRED_COLUMNS = ("prompt", "small_score", "large_score")
OPTIONAL_COLUMNS = (
    "id", "dataset", "task", "small_model", "large_model", "small_response", "large_response",
    "small_cost", "large_cost", "small_logprobs", "small_samples",
)


def load_outcomes(paths: Sequence[str | Path]):
    """Read one or more outcome parquet files into one DataFrame (needs pandas + pyarrow).

    Rows that cannot be used (no prompt, or a missing or non-finite score) are left out and
    counted in `frame.attrs["left_out"]` by file; a file with no usable row is an error.
    """
    import pandas as pd

    frames, left_out = [], {}
    for path in paths:
        frame = pd.read_parquet(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        usable = _usable(frame)
        if not usable.any():
            raise ValueError(f"{path}: no row has a prompt and both scores")
        if not usable.all():
            left_out[Path(path).name] = int((~usable).sum())
            frame = frame[usable].reset_index(drop=True)
        for column in OPTIONAL_COLUMNS:
            if column not in frame.columns:
                frame[column] = None
        if frame["dataset"].isna().all():
            frame["dataset"] = Path(path).stem
        frame["source_file"] = Path(path).stem
        frames.append(frame[[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, "source_file"]])
    data = pd.concat(frames, ignore_index=True)
    data["prompt"] = data["prompt"].astype(str)
    data["small_response"] = data["small_response"].astype(object).where(
        data["small_response"].notna(), None
    )
    data.attrs["left_out"] = left_out
    return data


def _usable(frame):
    """Rows with a non-empty prompt and finite small and large scores."""
    import pandas as pd

    prompt = frame["prompt"].map(lambda p: isinstance(p, str) and bool(p.strip()))
    scores = [pd.to_numeric(frame[c], errors="coerce") for c in ("small_score", "large_score")]
    return prompt & np.isfinite(scores[0]) & np.isfinite(scores[1])


def add_peer_samples(frame):
    """Stand-ins for extra small-model samples: where several files hold the same prompt (same
    dataset, id and prompt) answered by different small models, each row's `small_samples`
    become the other small models' answers. Rows that already carry samples are kept."""
    has_id = frame["id"].notna()
    key = frame["dataset"].astype(str) + "\0" + frame["id"].astype(str).where(has_id, "") + (
        "\0" + frame["prompt"])
    answered = frame["small_response"].map(lambda a: isinstance(a, str))
    by_key: dict[str, list[tuple[str, str]]] = {}
    for k, model, answer in zip(key[answered], frame["small_model"][answered].astype(str),
                                frame["small_response"][answered], strict=True):
        by_key.setdefault(k, []).append((model, answer))
    samples = [
        [a for m, a in by_key.get(k, ()) if m != str(model)] or None
        for k, model in zip(key, frame["small_model"], strict=True)
    ]
    out = frame.copy()
    keep = out["small_samples"].map(lambda s: s is not None and len(s) > 0)
    out["small_samples"] = [old if kept else new for old, kept, new in zip(
        out["small_samples"], keep, samples, strict=True)]
    return out


def fingerprint(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of each data file, keyed by file name (what a bundle was trained on)."""
    out = {}
    for path in sorted(Path(p) for p in paths):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def default_cache_dir() -> Path:
    """$SMALLFIRST_CACHE_DIR, else `.cache-embeddings/` in the working directory."""
    return Path(os.environ.get("SMALLFIRST_CACHE_DIR") or ".cache-embeddings")


def _key(model_id: str, text: str) -> bytes:
    return hashlib.sha256(f"{model_id}\0{text}".encode()).digest()[:16]


class EmbeddingCache:
    """Embeddings of texts kept on disk in append-only shards, keyed by a hash of the text."""

    def __init__(self, directory: Path, model_id: str) -> None:
        self.directory = Path(directory)
        self.model_id = model_id
        self._vectors: dict[bytes, np.ndarray] = {}
        for shard in sorted(self.directory.glob(f"{model_id}-*.npz")):
            with np.load(shard, allow_pickle=False) as npz:
                keys, vectors = npz["keys"], npz["vectors"]
            self._vectors.update(zip((k.tobytes() for k in keys), vectors, strict=True))

    def get_many(
        self,
        texts: Sequence[str],
        compute: Callable[[list[str]], np.ndarray],
        batch_size: int = 32,
        progress: Callable[[Iterable], Iterable] | None = None,
    ) -> np.ndarray:
        """Vectors for `texts`, computing (in length-sorted batches) and storing the missing."""
        keys = [_key(self.model_id, t) for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True)
                          if k not in self._vectors}.items(), key=lambda kv: len(kv[1]))
        batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
        new_keys, new_vectors = [], []
        for index, batch in enumerate(progress(batches) if progress else batches):
            vectors = compute([t for _, t in batch])
            for (key, _), vector in zip(batch, vectors, strict=True):
                self._vectors[key] = vector
                new_keys.append(key)
                new_vectors.append(vector)
            if len(new_keys) >= 2048 or index == len(batches) - 1:
                self._write_shard(new_keys, new_vectors)
                new_keys, new_vectors = [], []
        return np.stack([self._vectors[k] for k in keys]) if keys else np.zeros((0, 384))

    def _write_shard(self, keys: list[bytes], vectors: list[np.ndarray]) -> None:
        if not keys:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(b"".join(keys)).hexdigest()[:16]
        tmp = self.directory / f".{self.model_id}-{name}.tmp.npz"
        keys_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
        np.savez(tmp, keys=keys_array, vectors=np.stack(vectors))
        tmp.replace(self.directory / f"{self.model_id}-{name}.npz")
