"""Fitted gradient-boosted trees reach the numpy `TreeEnsemble` through treelite's model dump:
the exported raw score is scikit-learn's `decision_function`, NaN rows included, for the
router's trees and for the cache's pair verifier (through its JSON and loader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("treelite")

from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: E402

from router.models import TreeEnsemble  # noqa: E402
from router.pairs import training  # noqa: E402
from router.pairs.verifier import FEATURES, MONOTONE, PairVerifier, content_hash  # noqa: E402
from router.train import TrainConfig  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cache_pairs.csv"


def _random_rows(seed: int, n: int = 800, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[rng.random(x.shape) < 0.2] = np.nan
    score = np.nan_to_num(x[:, 0]) - 0.7 * np.nan_to_num(x[:, 1]) + np.isnan(x[:, 2])
    return x, (score + rng.normal(size=n) > 0).astype(int)


def _router_trees(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray
) -> HistGradientBoostingClassifier:
    config = TrainConfig()  # the router's tree settings (router.train._fit_trees), fewer trees
    return HistGradientBoostingClassifier(
        max_iter=60, learning_rate=config.learning_rate, max_leaf_nodes=config.max_leaf_nodes,
        max_depth=config.max_depth, min_samples_leaf=config.min_samples_leaf,
        l2_regularization=config.l2_regularization, early_stopping=False,
        categorical_features=None, random_state=config.seed,
    ).fit(x, y, sample_weight=weights)


def _verifier_trees(x: np.ndarray, y: np.ndarray) -> HistGradientBoostingClassifier:
    monotone = [1, -1, 0, 0, 1, 0][: x.shape[1]]
    return HistGradientBoostingClassifier(
        random_state=0, monotonic_cst=monotone, **{**training.GBM, "max_iter": 60}).fit(x, y)


def _assert_same_raw(trees: TreeEnsemble, model, x: np.ndarray) -> None:
    want = model.decision_function(x)
    np.testing.assert_allclose(trees.raw(x), want, rtol=0, atol=1e-9)
    single = np.array([trees.raw(row[None, :])[0] for row in x[:50]])
    np.testing.assert_allclose(single, want[:50], rtol=0, atol=1e-9)


@pytest.mark.parametrize("fit", ["router", "verifier"])
def test_exported_raw_score_is_decision_function_with_missing_values(fit: str) -> None:
    x, y = _random_rows(seed=3)
    weights = np.random.default_rng(4).uniform(0.2, 2.0, size=len(y))
    model = _router_trees(x, y, weights) if fit == "router" else _verifier_trees(x, y)
    trees = TreeEnsemble.from_sklearn(model)
    probe, _ = _random_rows(seed=5, n=400)
    probe[:20] = np.nan  # every split's missing side, on every tree
    probe[20:30] = np.inf
    probe[30:40] = -np.inf
    assert np.isnan(probe).any(axis=1).mean() > 0.5
    _assert_same_raw(trees, model, np.vstack([x, probe]))
    restored = TreeEnsemble.from_arrays(trees.to_arrays("t/"), "t/")
    np.testing.assert_array_equal(restored.raw(probe), trees.raw(probe))


def test_splits_on_missing_values_alone() -> None:
    """scikit-learn sends all present values left with a +inf threshold (treelite's JSON dump
    writes no value for it, which is why the trees are read through its field accessors)."""
    x, _ = _random_rows(seed=10)
    y = np.isnan(x[:, 0]).astype(int)
    model = _router_trees(x, y, np.ones(len(y)))
    trees = TreeEnsemble.from_sklearn(model)
    splits = trees.left != np.arange(len(trees.left))
    assert np.isposinf(trees.threshold[splits]).any()
    probe = np.vstack([x, np.full((1, x.shape[1]), np.nan), np.full((1, x.shape[1]), np.inf)])
    _assert_same_raw(trees, model, probe)


def test_thresholds_keep_float64() -> None:
    """A row exactly on a threshold goes left, as in scikit-learn (float32 thresholds would
    send rows lying between the two roundings the other way)."""
    x, y = _random_rows(seed=6)
    model = _router_trees(x, y, np.ones(len(y)))
    trees = TreeEnsemble.from_sklearn(model)
    splits = trees.left != np.arange(len(trees.left))
    on_edge = np.zeros((int(splits.sum()), x.shape[1]))
    on_edge[np.arange(len(on_edge)), trees.feature[splits]] = trees.threshold[splits]
    nudged = on_edge.copy()
    nudged[np.arange(len(on_edge)), trees.feature[splits]] = np.nextafter(
        trees.threshold[splits], np.inf)
    _assert_same_raw(trees, model, np.vstack([on_edge, nudged]))


def test_verifier_export_round_trips_through_its_loader(tmp_path: Path) -> None:
    frame = training.read_pairs(FIXTURE)
    x = training.pair_matrix(frame, None)
    y = frame.same_answer.to_numpy().astype(int)
    model = training.fit(x, y)
    assert model.get_params()["monotonic_cst"] == [MONOTONE.get(n, 0) for n in FEATURES]
    body = {**training.export(model), "calibration": [[0.5, 0.0, 0.0, 1.0]]}
    assert set(body) == {"features", "init", "learning_rate", "trees", "calibration"}
    for tree in body["trees"]:
        assert set(tree) == {"feature", "threshold", "left", "right", "value"}
        assert len({len(column) for column in tree.values()}) == 1
        assert all(type(v) is float for v in tree["threshold"] + tree["value"])
    path = tmp_path / "verifier.json"
    path.write_text(json.dumps({**body, "sha256": content_hash(body)}, separators=(",", ":")))
    loaded = PairVerifier.load(path)
    assert not np.isnan(x).any()  # the JSON layout has no missing side
    _assert_same_raw(loaded.trees, model, x)


def test_shipped_verifier_still_loads_and_scores() -> None:
    frame = training.read_pairs(FIXTURE).head(200)
    verifier = PairVerifier.load()
    prob = [verifier.probability_of(row) for row in training.pair_matrix(frame, None)]
    assert all(0.0 <= p <= 1.0 for p in prob) and len(set(prob)) > 10


def _treelite_model():
    import treelite.sklearn

    x, y = _random_rows(seed=7, n=200)
    return treelite.sklearn.import_model(
        HistGradientBoostingClassifier(max_iter=3, max_depth=3).fit(x, y))


def _set(model, field: str, change, tree: int | None = 0) -> None:
    accessor = model.get_header_accessor() if tree is None else model.get_tree_accessor(tree)
    accessor.set_field(field, change(np.array(accessor.get_field(field))))


def _at_first_split(value):
    def change(kinds: np.ndarray) -> np.ndarray:
        kinds[0] = value  # node 0 is a split in these trees
        return kinds
    return change


@pytest.mark.parametrize("field, change, tree", [
    ("cmp", _at_first_split(2), 0),  # x < threshold
    ("node_type", _at_first_split(2), 1),  # a categorical split
    ("has_categorical_split", lambda v: v + 1, 2),
    ("cleft", _at_first_split(0), 0),  # a loop back to the root
    ("task_type", lambda v: v + 2, None),  # multiclass
    ("base_scores", lambda v: np.concatenate([v, v]), None),
])
def test_anything_the_walk_cannot_reproduce_fails_loudly(field, change, tree) -> None:
    model = _treelite_model()
    TreeEnsemble.from_treelite(model)
    _set(model, field, change, tree)
    with pytest.raises(ValueError, match="tree model"):
        TreeEnsemble.from_treelite(model)


def test_multiclass_models_are_refused() -> None:
    x, _ = _random_rows(seed=9, n=300)
    y = np.arange(len(x)) % 3
    with pytest.raises(ValueError, match="tree model: task_type"):
        TreeEnsemble.from_sklearn(HistGradientBoostingClassifier(max_iter=2).fit(x, y))
