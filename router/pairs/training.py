"""Train, calibrate and evaluate the pair verifier on labelled query pairs.

Pairs are split by family, never by row: templated families would otherwise leak between
train and test. The long-context families (`ctx_<name>/...`) share their contexts, so they are
grouped by context; the Quora and documentation pairs are real, untemplated pairs, grouped by
connected questions. A quarter of the groups are held out for the reported figures; the
threshold table comes from 5-fold cross-fitting (again by group, pooled over
`CALIBRATION_REPEATS` different assignments of groups to folds) inside the training groups.

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

from router.models import TreeEnsemble
from router.pairs.vectors import Embed, cache_vectors
from router.pairs.verifier import (
    FEATURES,
    MODEL_PATH,
    MONOTONE,
    PairDiff,
    PairVerifier,
    changed_part_cosines,
    content_hash,
    features,
    vetoed,
)

DEFAULT_PAIRS = Path("../shared/data/cache_pairs/pairs.parquet")
EMBEDDING_CACHE = Path(".cache-embeddings")
HELD_OUT_SHARE = 0.25
CALIBRATION_REPEATS = 10
UNTEMPLATED = ("qqp", "mock_data")
# Negatives weigh 10x: a wrong answer served costs far more than a paraphrase missed, and the
# weight keeps noisy, lexically close negatives from sharing the top scores with clean
# paraphrases (chosen on cross-fitted training folds, never on the held-out groups).
GBM = {"max_iter": 300, "max_depth": 4, "learning_rate": 0.05, "min_samples_leaf": 20,
       "l2_regularization": 1.0, "class_weight": {0: 10, 1: 1}}


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
    if "family" not in frame.columns:  # hand-built pairs: each row is its own family
        frame["family"] = [f"row/{row_id(a, b)}" for a, b in zip(frame.q1, frame.q2,
                                                                  strict=True)]
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


def pair_matrix(frame: Any, embed: Embed | None,
                cache_dir: Path | None = EMBEDDING_CACHE) -> np.ndarray:
    """The verifier's features for every row (cosines cached on disk between runs, keyed by
    the embedder's `vectors_id`).

    Columns `cosine` and `diff_cosine`, when the file has them, are used as given.
    """
    pairs = list(zip(frame.q1, frame.q2, strict=True))
    if {"cosine", "diff_cosine"} <= set(frame.columns):  # precomputed (e.g. test fixtures)
        cosine, diff = frame.cosine.to_numpy(), frame.diff_cosine.to_numpy()
    else:
        cosine, diff = _embedding_inputs(pairs, embed, cache_dir)
    return np.stack([features(a, b, c, d) for (a, b), c, d in zip(pairs, cosine, diff,
                                                                    strict=True)])


def pair_cosines(frame: Any, embed: Embed | None,
                 cache_dir: Path | None = EMBEDDING_CACHE) -> np.ndarray:
    """The cosine of each pair's whole texts, as the cache's search sees it (its
    `semantic_min_cosine` gate): the verifier's `cosine` column holds the last lines' when
    two prompts share their context."""
    if "cosine" in frame.columns:
        return frame.cosine.to_numpy()
    vectors_id = getattr(embed, "vectors_id", None)
    return _whole_cosines(list(zip(frame.q1, frame.q2, strict=True)), embed,
                          cache_dir if vectors_id is not None else None)


def _whole_cosines(pairs: list[tuple[str, str]], embed: Embed | None,
                   cache_dir: Path | None) -> np.ndarray:
    return _cached(cache_dir, "cache-pairs", [getattr(embed, "vectors_id", None), pairs],
                   lambda: _pair_cosines(embed, pairs))


def _embedding_inputs(
    pairs: list[tuple[str, str]], embed: Embed | None, cache_dir: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pair cosines and changed-part cosines, each cached under a hash of what was embedded
    and of the vectors' id (not cached when the embedder names none)."""
    vectors_id = getattr(embed, "vectors_id", None)
    if vectors_id is None:
        cache_dir = None
    cosine = _whole_cosines(pairs, embed, cache_dir)
    diffs = [PairDiff.of(a, b) for a, b in pairs]
    diff = _cached(cache_dir, "cache-diffs", [vectors_id, [d.compared_texts() for d in diffs]],
                   lambda: changed_part_cosines(embed, diffs))
    return cosine, diff


def _pair_cosines(embed: Embed | None, pairs: list[tuple[str, str]]) -> np.ndarray:
    vectors = cache_vectors(embed, [t for pair in pairs for t in pair])  # type: ignore[arg-type]
    return np.einsum("ij,ij->i", vectors[0::2], vectors[1::2]).astype(np.float64)


def _cached(cache_dir: Path | None, name: str, inputs: Any, compute: Any) -> np.ndarray:
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    values = np.asarray(compute(), dtype=np.float64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, values)
    return values


def fit(x: np.ndarray, y: np.ndarray, seed: int = 0, trees: int | None = None) -> Any:
    """Gradient-boosted trees with monotone constraints, on the rows no veto rejects
    (`trees` overrides the recipe's count, for quicker evaluations only)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    keep = ~np.array([vetoed(row) for row in x])
    gbm = GBM if trees is None else {**GBM, "max_iter": trees}
    model = HistGradientBoostingClassifier(
        random_state=seed, monotonic_cst=[MONOTONE.get(name, 0) for name in FEATURES], **gbm)
    return model.fit(x[keep], y[keep])


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    prob = model.predict_proba(x)[:, 1]
    prob[np.array([vetoed(row) for row in x])] = 0.0
    return prob


def export(model: Any) -> dict[str, Any]:
    """The fitted trees as plain JSON-able lists (leaves have left = -1), read through
    `TreeEnsemble.from_sklearn`. The layout has no missing side: the loader sends NaN right
    at every split."""
    trees = TreeEnsemble.from_sklearn(model)
    return {"features": FEATURES, "init": trees.baseline, "learning_rate": 1.0,
            "trees": [{key: tree[key].tolist() for key in
                       ("feature", "threshold", "left", "right", "value")}
                      for tree in trees.per_tree()]}


def calibration(prob: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> list[list[float]]:
    """Rows of [threshold, worst-kind false-hit rate, overall false-hit rate, hit rate]."""
    table = []
    negative_kinds = sorted(set(kinds[y == 0]))
    high = np.sort(prob[prob >= 0.5])
    grid = np.unique(np.concatenate([np.round(np.arange(0.5, 1.0, 0.01), 4),
                                     np.quantile(high, np.linspace(0, 1, 400)) if len(high)
                                     else []]))
    for threshold in grid:
        accepted = prob >= threshold
        worst = max(accepted[(y == 0) & (kinds == k)].mean() for k in negative_kinds)
        table.append([round(float(threshold), 6), round(float(worst), 5),
                      round(float(accepted[y == 0].mean()), 5),
                      round(float(accepted[y == 1].mean()), 5)])
    return table


def cross_fitted(x: np.ndarray, y: np.ndarray, names: list[str], seed: int,
                 repeats: int = CALIBRATION_REPEATS, trees: int | None = None) -> np.ndarray:
    """Out-of-fold probabilities, shape (repeats, rows): each row scored by a model that
    never saw its group, over `repeats` different assignments of groups to folds. The
    top of the table rests on a handful of negatives; one split alone moved the chosen
    threshold enough to change the hit rate by several points."""
    from sklearn.model_selection import GroupKFold

    out = []
    for repeat in range(repeats):
        shuffled = [zlib.crc32(f"{seed}:{repeat}:{name}".encode()) for name in names]
        prob = np.zeros(len(y))
        for train, test in GroupKFold(n_splits=5).split(x, y, shuffled):
            prob[test] = predict(fit(x[train], y[train], seed, trees), x[test])
        out.append(prob)
    return np.stack(out)


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
    body["calibration"] = calibration(oof.ravel(), np.tile(y[train_rows], len(oof)),
                                      np.tile(frame.kind.to_numpy()[train_rows], len(oof)))
    body["trained_rows"] = sorted(row_id(a, b) for a, b, keep in
                                  zip(frame.q1, frame.q2, train_rows, strict=True) if keep)
    body["gbm"] = GBM
    verifier = PairVerifier(body)
    check = np.array([verifier.probability_of(row) for row in x[test][:200]])
    assert np.allclose(check, predict(model, x[test][:200]), atol=1e-4)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**body, "sha256": content_hash(body)}, separators=(",", ":")))
    return {"rows": len(frame), "train_rows": int(train_rows.sum()),
            "held_out_rows": int(test.sum()), "model": out.name}
