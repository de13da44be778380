"""Train, calibrate and evaluate the pair verifier on labelled query pairs.

Pairs are split by family, never by row: templated families would otherwise leak between
train and test. The long-context families (`ctx_<name>/...`) share their contexts, so they are
grouped by context; the Quora and documentation pairs are real, untemplated pairs, grouped by
connected questions. A quarter of the groups are held out for the reported figures; the
threshold table comes from 5-fold cross-fitting (again by group) inside the training groups.

Rebuild the shipped model with `smallfirst cache train` (needs pandas and pyarrow: the `dev`
or `train` extra, and the labelled pairs).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cache.vectors import Embed, cache_vectors
from gateway.cache.verifier import (
    FEATURES,
    MODEL_PATH,
    PairVerifier,
    content_hash,
    diff_cosines,
    features,
)

DEFAULT_PAIRS = Path("../shared/data/cache_pairs/pairs.parquet")
EMBEDDING_CACHE = Path(".cache-embeddings")
HELD_OUT_SHARE = 0.25
UNTEMPLATED = ("qqp", "mock_data")
GBM = {"n_estimators": 250, "max_depth": 3, "learning_rate": 0.08, "subsample": 0.8,
       "min_samples_leaf": 5}


def read_pairs(path: Path) -> Any:
    """The pairs as a DataFrame (parquet, CSV or JSON lines) with the labelled columns."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    else:
        frame = pd.read_csv(path)
    missing = {"q1", "q2", "same_answer", "kind"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    if "family" not in frame.columns:
        frame["family"] = frame["kind"]
    return frame.reset_index(drop=True)


def row_id(q1: str, q2: str) -> str:
    return hashlib.sha256(f"{q1}\x00{q2}".encode()).hexdigest()[:12]


def groups(frame: Any) -> list[str]:
    """The split unit of each row (see the module docstring)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for family, q1, q2 in zip(frame.family, frame.q1, frame.q2, strict=True):
        if family in UNTEMPLATED:
            parent[find(q2)] = find(q1)
    out = []
    for family, q1 in zip(frame.family, frame.q1, strict=True):
        if family in UNTEMPLATED:
            out.append(f"{family}/{zlib.crc32(find(q1).encode()) % 16}")
        elif family.startswith("ctx_"):
            out.append(family.split("/")[0])
        else:
            out.append(family)
    return out


def held_out(frame: Any, seed: int = 0) -> np.ndarray:
    """Rows whose group is held out; the first seed that leaves every kind on both sides."""
    names = groups(frame)
    kinds = set(frame.kind)
    for attempt in range(seed, seed + 100):
        mask = np.array([zlib.crc32(f"{attempt}:{g}".encode()) % 1000 < HELD_OUT_SHARE * 1000
                         for g in names])
        if set(frame.kind[mask]) == kinds and set(frame.kind[~mask]) == kinds:
            return mask
    raise ValueError("no split keeps every kind on both sides")


def pair_matrix(frame: Any, embed: Embed, cache_dir: Path | None = EMBEDDING_CACHE) -> np.ndarray:
    """The verifier's features for every row (embeddings cached on disk between runs)."""
    pairs = list(zip(frame.q1, frame.q2, strict=True))
    cosine, diff = _embedding_inputs(pairs, embed, cache_dir)
    return np.stack([features(a, b, c, d) for (a, b), c, d in zip(pairs, cosine, diff,
                                                                    strict=True)])


def _embedding_inputs(
    pairs: list[tuple[str, str]], embed: Embed, cache_dir: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    key = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    path = cache_dir / f"cache-pairs-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        stored = np.load(path)
        return stored["cosine"], stored["diff"]
    vectors = cache_vectors(embed, [t for pair in pairs for t in pair])
    cosine = np.einsum("ij,ij->i", vectors[0::2], vectors[1::2]).astype(np.float64)
    diff = diff_cosines(embed, pairs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, cosine=cosine, diff=diff)
    return cosine, diff


def fit(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(random_state=seed, **GBM).fit(x, y)


def export(model: Any) -> dict[str, Any]:
    """The fitted trees as plain JSON-able lists."""
    prior = float(model.init_.class_prior_[1])
    trees = []
    for (estimator,) in model.estimators_:
        tree = estimator.tree_
        trees.append({
            "feature": tree.feature.tolist(),
            "threshold": [round(float(t), 6) for t in tree.threshold],
            "left": tree.children_left.tolist(),
            "right": tree.children_right.tolist(),
            "value": [round(float(v), 6) for v in tree.value[:, 0, 0]],
        })
    return {"features": FEATURES, "init": float(np.log(prior / (1 - prior))),
            "learning_rate": model.learning_rate, "trees": trees}


def calibration(prob: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> list[list[float]]:
    """Rows of [threshold, worst-kind false-hit rate, overall false-hit rate, hit rate]."""
    table = []
    negative_kinds = sorted(set(kinds[y == 0]))
    for threshold in np.round(np.arange(0.5, 1.0, 0.0025), 4):
        accepted = prob >= threshold
        worst = max(accepted[(y == 0) & (kinds == k)].mean() for k in negative_kinds)
        table.append([float(threshold), round(float(worst), 5),
                      round(float(accepted[y == 0].mean()), 5),
                      round(float(accepted[y == 1].mean()), 5)])
    return table


def cross_fitted(x: np.ndarray, y: np.ndarray, names: list[str], seed: int) -> np.ndarray:
    """Out-of-fold probabilities: each row scored by a model that never saw its group."""
    from sklearn.model_selection import GroupKFold

    prob = np.zeros(len(y))
    for train, test in GroupKFold(n_splits=5).split(x, y, names):
        prob[test] = fit(x[train], y[train], seed).predict_proba(x[test])[:, 1]
    return prob


def train(
    pairs_path: Path, embed: Embed, out: Path = MODEL_PATH, seed: int = 0
) -> dict[str, Any]:
    """Fit on the training groups, calibrate by cross-fitting, write the model JSON."""
    frame = read_pairs(pairs_path)
    x = pair_matrix(frame, embed)
    y = frame.same_answer.to_numpy().astype(int)
    test = held_out(frame, seed)
    train_rows = ~test
    names = [g for g, keep in zip(groups(frame), train_rows, strict=True) if keep]
    oof = cross_fitted(x[train_rows], y[train_rows], names, seed)
    model = fit(x[train_rows], y[train_rows], seed)
    body = export(model)
    body["calibration"] = calibration(oof, y[train_rows], frame.kind.to_numpy()[train_rows])
    body["trained_rows"] = sorted(row_id(a, b) for a, b, keep in
                                  zip(frame.q1, frame.q2, train_rows, strict=True) if keep)
    body["gbm"] = GBM
    verifier = PairVerifier(body)
    check = np.array([verifier.probability_of(row) for row in x[test][:200]])
    assert np.allclose(check, model.predict_proba(x[test][:200])[:, 1], atol=1e-4)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**body, "sha256": content_hash(body)}, separators=(",", ":")))
    return {"rows": len(frame), "train_rows": int(train_rows.sum()),
            "held_out_rows": int(test.sum()), "model": str(out)}
