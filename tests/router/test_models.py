import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from router.models import LinearPart, PlattCalibrator, StackedModel, TreeEnsemble


def test_exported_trees_match_sklearn_including_missing_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    x[rng.random(x.shape) < 0.2] = np.nan
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) * 0.5 + rng.normal(size=400) > 0)
    model = HistGradientBoostingClassifier(max_iter=30, max_leaf_nodes=7).fit(x, y)
    trees = TreeEnsemble.from_sklearn(model)
    np.testing.assert_allclose(trees.raw(x), model.decision_function(x), atol=1e-9)
    restored = TreeEnsemble.from_arrays(trees.to_arrays("t/"), "t/")
    np.testing.assert_allclose(restored.raw(x[:3]), trees.raw(x[:3]))


def test_stacked_model_round_trip():
    rng = np.random.default_rng(1)
    linear = LinearPart(rng.normal(size=384), 0.3)
    model = StackedModel(np.array([0, 2], dtype=np.int32), linear, None, PlattCalibrator(2.0, -1))
    hand, emb = rng.normal(size=(4, 5)), rng.normal(size=(4, 384))
    restored = StackedModel.from_arrays(model.to_arrays("m/"), "m/")
    np.testing.assert_allclose(restored.predict(hand, emb), model.predict(hand, emb))
    probs = model.predict(hand, emb)
    assert ((probs > 0) & (probs < 1)).all()


def test_lexical_serving_path_matches_training_path():
    from router import lexical
    from router.lexical import LexicalPart

    texts = ["what is the capital of France", "how many sheep are there in total", "x"]
    tf = lexical.matrix(texts)
    idf = lexical.fit_idf(tf)
    weights = np.random.default_rng(0).normal(size=lexical.BUCKETS).astype(np.float32)
    part = LexicalPart(weights, 0.1, idf)
    np.testing.assert_allclose(part.logit(texts), lexical.weigh(tf, idf) @ weights + 0.1,
                               atol=1e-5)
    restored = LexicalPart.from_arrays(part.to_arrays("l/"), "l/")
    np.testing.assert_allclose(restored.logit(texts), part.logit(texts), atol=1e-2)


def test_source_weights_balance_sources():
    from router.train import source_weights

    w = source_weights(["a"] * 90 + ["b"] * 10, power=1.0)
    assert w.mean() == 1.0 or abs(w.mean() - 1.0) < 1e-12
    assert abs(w[:90].sum() - w[90:].sum()) < 1e-9
    assert (source_weights(["a", "b"], power=0.5) == 1.0).all()


def test_single_row_walk_matches_batch_walk():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4))
    x[rng.random(x.shape) < 0.3] = np.nan
    y = np.nan_to_num(x[:, 0]) > 0
    trees = TreeEnsemble.from_sklearn(HistGradientBoostingClassifier(max_iter=20).fit(x, y))
    batch = trees.raw(x[:20])
    np.testing.assert_allclose([trees.raw(row[None, :])[0] for row in x[:20]], batch)


def test_rows_neither_model_got_right_shape_only_the_parts_configured_to_see_them():
    """Their "good enough" label is an accident of both failing. By default the difficulty
    model's linear parts and the confidence trees do not see it (calibration always does);
    the difficulty trees and the confidence model's linear parts do."""
    from router.features import FEATURE_NAMES
    from router.train import Matrices, TrainConfig, fit

    rng = np.random.default_rng(0)
    n = 240
    embedding = rng.normal(size=(n, 384)).astype(np.float32)
    small = (embedding[:, 0] > 0).astype(float)
    large = np.ones(n)
    neither = np.arange(n) % 4 == 0
    large[neither], small[neither] = 0.0, 0.0  # good enough: 0 >= 0 - 0.05
    flipped = small.copy()
    flipped[neither] = -1.0  # not good enough, and still neither right
    hand, prompts = np.full((n, len(FEATURE_NAMES)), np.nan), [f"prompt {i}" for i in range(n)]

    def trained(small_scores, **config):
        m = Matrices(hand, embedding, small_scores, large, np.ones(n, bool), prompts)
        # a stronger penalty on the lexical part (still fitted) makes its solver converge fast
        return fit(m, TrainConfig(max_iter=20, inner_folds=2, lexical_c=0.1, **config))

    a, b = trained(small), trained(flipped)
    np.testing.assert_allclose(a.difficulty.linear.coef, b.difficulty.linear.coef)
    assert not np.allclose(a.confidence.linear.coef, b.confidence.linear.coef)
    difficulty = [model.difficulty.predict(hand, embedding, prompts) for model in (a, b)]
    assert not np.allclose(*difficulty)
    blind = {"neither_right_confidence_linear": 0.0}  # the trees then get the same inputs
    np.testing.assert_allclose(trained(small, **blind).confidence.trees.value,
                               trained(flipped, **blind).confidence.trees.value)
