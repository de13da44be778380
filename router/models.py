"""The scoring models, as plain arrays: no pickle, numpy-only inference.

A `StackedModel` is: a logistic regression on the prompt embedding (its logit becomes one more
feature), gradient-boosted trees over hand features plus that logit, and Platt scaling of the
trees' raw score into a calibrated probability. Training uses scikit-learn; the fitted parts are
exported to arrays, so serving needs numpy alone and a bundle never holds executable objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LinearPart", "PlattCalibrator", "StackedModel", "TreeEnsemble"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


@dataclass(frozen=True)
class LinearPart:
    """A logistic-regression logit over a dense vector (the embedding)."""

    coef: np.ndarray  # (d,)
    intercept: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef + self.intercept

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}coef": self.coef, f"{prefix}intercept": np.array([self.intercept])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> LinearPart:
        return cls(arrays[f"{prefix}coef"], float(arrays[f"{prefix}intercept"][0]))


@dataclass(frozen=True)
class TreeEnsemble:
    """Binary-classification gradient-boosted trees in padded arrays (n_trees, max_nodes)."""

    feature: np.ndarray  # int32
    threshold: np.ndarray  # float64; go left when x <= threshold
    left: np.ndarray  # int32
    right: np.ndarray  # int32
    missing_left: np.ndarray  # bool; where NaN goes
    leaf: np.ndarray  # bool
    value: np.ndarray  # float64 leaf values
    baseline: float
    depth: int

    @classmethod
    def from_sklearn(cls, model) -> TreeEnsemble:
        """Export a fitted binary `HistGradientBoostingClassifier` (numerical features only)."""
        trees = [predictors[0].nodes for predictors in model._predictors]
        width = max(len(t) for t in trees)

        def pad(field: str, dtype: type) -> np.ndarray:
            out = np.zeros((len(trees), width), dtype=dtype)
            for row, nodes in enumerate(trees):
                out[row, : len(nodes)] = nodes[field]
            return out

        return cls(
            feature=pad("feature_idx", np.int32),
            threshold=pad("num_threshold", np.float64),
            left=pad("left", np.int32),
            right=pad("right", np.int32),
            missing_left=pad("missing_go_to_left", bool),
            leaf=pad("is_leaf", bool),
            value=pad("value", np.float64),
            baseline=float(np.ravel(model._baseline_prediction)[0]),
            depth=int(max(t["depth"].max() for t in trees)),
        )

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Raw log-odds for rows x (n, d); NaN follows each split's learned missing side."""
        x = np.atleast_2d(x)
        trees = np.arange(self.feature.shape[0])[None, :]
        node = np.zeros((x.shape[0], self.feature.shape[0]), dtype=np.int32)
        rows = np.arange(x.shape[0])[:, None]
        for _ in range(self.depth):
            values = x[rows, self.feature[trees, node]]
            missing = self.missing_left[trees, node]
            go_left = np.where(np.isnan(values), missing, values <= self.threshold[trees, node])
            child = np.where(go_left, self.left[trees, node], self.right[trees, node])
            node = np.where(self.leaf[trees, node], node, child)
        return self.value[trees, node].sum(axis=1) + self.baseline

    _FIELDS = ("feature", "threshold", "left", "right", "missing_left", "leaf", "value")

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}{name}": getattr(self, name) for name in self._FIELDS}
        arrays[f"{prefix}scalars"] = np.array([self.baseline, self.depth], dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> TreeEnsemble:
        baseline, depth = arrays[f"{prefix}scalars"]
        parts = {name: arrays[f"{prefix}{name}"] for name in cls._FIELDS}
        return cls(**parts, baseline=float(baseline), depth=int(depth))


@dataclass(frozen=True)
class PlattCalibrator:
    """p = sigmoid(a * raw + b), fitted on out-of-fold raw scores."""

    a: float = 1.0
    b: float = 0.0

    @classmethod
    def fit(cls, raw: np.ndarray, labels: np.ndarray) -> PlattCalibrator:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1e4).fit(raw.reshape(-1, 1), labels)
        return cls(float(model.coef_[0, 0]), float(model.intercept_[0]))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a * raw + self.b)


@dataclass(frozen=True)
class StackedModel:
    """Embedding logit + hand features -> trees -> calibrated probability.

    `columns` index the hand-feature row (see `router.features.FEATURE_NAMES`); the embedding
    logit is appended as the last tree input when `linear` is set.
    """

    columns: np.ndarray  # int32 indices into the hand-feature row
    linear: LinearPart | None
    trees: TreeEnsemble | None
    calibrator: PlattCalibrator

    def tree_input(self, hand: np.ndarray, embedding: np.ndarray | None) -> np.ndarray:
        parts = [np.atleast_2d(hand)[:, self.columns]]
        if self.linear is not None:
            if embedding is None:
                raise ValueError("this model needs the prompt embedding")
            parts.append(self.linear.logit(np.atleast_2d(embedding))[:, None])
        return np.hstack(parts)

    def raw(self, hand: np.ndarray, embedding: np.ndarray | None) -> np.ndarray:
        x = self.tree_input(hand, embedding)
        return self.trees.raw(x) if self.trees is not None else x[:, -1]

    def predict(self, hand: np.ndarray, embedding: np.ndarray | None) -> np.ndarray:
        """Calibrated probabilities that the small answer is good enough, shape (n,)."""
        return self.calibrator(self.raw(hand, embedding))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {
            f"{prefix}columns": self.columns,
            f"{prefix}platt": np.array([self.calibrator.a, self.calibrator.b]),
        }
        if self.linear is not None:
            arrays.update(self.linear.to_arrays(f"{prefix}linear_"))
        if self.trees is not None:
            arrays.update(self.trees.to_arrays(f"{prefix}trees_"))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> StackedModel:
        has_linear = f"{prefix}linear_coef" in arrays
        has_trees = f"{prefix}trees_scalars" in arrays
        a, b = arrays[f"{prefix}platt"]
        return cls(
            columns=arrays[f"{prefix}columns"].astype(np.int32),
            linear=LinearPart.from_arrays(arrays, f"{prefix}linear_") if has_linear else None,
            trees=TreeEnsemble.from_arrays(arrays, f"{prefix}trees_") if has_trees else None,
            calibrator=PlattCalibrator(float(a), float(b)),
        )
