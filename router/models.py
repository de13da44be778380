"""The scoring models, as plain arrays: no pickle, numpy-only inference.

A `StackedModel` is: logistic regressions on the prompt embedding and on hashed prompt n-grams
(their logits become two more features), gradient-boosted trees over hand features plus those
logits, and Platt scaling of the trees' raw score into a calibrated probability. Training uses
scikit-learn; the fitted parts are exported to arrays, so serving needs numpy alone and a
bundle never holds executable objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.lexical import LexicalPart

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
    """Binary-classification gradient-boosted trees as flat node arrays.

    All trees' nodes sit in one array; `roots` holds each tree's first node. A leaf points to
    itself on both sides, so every tree is walked a fixed `depth` steps with no branching.
    """

    feature: np.ndarray  # int32
    threshold: np.ndarray  # float64; go left when x <= threshold (+inf at leaves)
    left: np.ndarray  # int32, global node index
    right: np.ndarray  # int32, global node index
    missing_left: np.ndarray  # bool; where NaN goes
    value: np.ndarray  # float64 leaf values (0 at split nodes)
    roots: np.ndarray  # int32
    baseline: float
    depth: int

    @classmethod
    def from_sklearn(cls, model) -> TreeEnsemble:
        """Export a fitted binary `HistGradientBoostingClassifier` (numerical features only)
        through treelite's model import (training only)."""
        import treelite.sklearn

        return cls.from_treelite(treelite.sklearn.import_model(model))

    @classmethod
    def from_treelite(cls, model) -> TreeEnsemble:
        """Trees from a `treelite.Model`, read through its field accessors (the fields of
        treelite's serialization format v4). Its JSON dump is not used: it writes an empty
        value for the +inf threshold of scikit-learn's splits on missing values alone. Only
        what the walk reproduces exactly is accepted: binary log-odds, float64
        `x <= threshold` splits, one value per leaf; anything else raises ValueError."""
        header = model.get_header_accessor()
        found = {name: np.asarray(header.get_field(name)).tolist() for name in _TREELITE_HEADER}
        for name, want in _TREELITE_HEADER.items():
            if found[name] != want:
                raise ValueError(f"tree model: {name} is {found[name]!r}, not {want!r}")
        base_scores = header.get_field("base_scores")
        if header.get_field("postprocessor") != "sigmoid" or base_scores.shape != (1,):
            raise ValueError("tree model: not one sigmoid-linked raw score")
        trees = [_treelite_tree(model.get_tree_accessor(i), i) for i in range(model.num_tree)]
        if not trees:
            raise ValueError("tree model: no trees")
        columns = {key: np.concatenate([tree[key] for tree, _ in trees]) for key in trees[0][0]}
        return cls.from_nodes(sizes=[len(tree["leaf"]) for tree, _ in trees], **columns,
                              baseline=float(base_scores[0]),
                              depth=max(depth for _, depth in trees))

    def per_tree(self) -> list[dict[str, np.ndarray]]:
        """Each tree's nodes, children indexed within the tree (-1 at leaves), as `from_nodes`
        takes them; `threshold` is 0 at leaves."""
        ends = [*self.roots[1:], len(self.feature)]
        trees = []
        for start, end in zip(self.roots, ends, strict=True):
            own = np.arange(start, end)
            leaf = self.left[start:end] == own
            trees.append({
                "feature": self.feature[start:end],
                "threshold": np.where(leaf, 0.0, self.threshold[start:end]),
                "left": np.where(leaf, -1, self.left[start:end] - start),
                "right": np.where(leaf, -1, self.right[start:end] - start),
                "missing_left": self.missing_left[start:end],
                "value": self.value[start:end],
            })
        return trees

    @classmethod
    def from_nodes(cls, sizes: list[int], leaf: np.ndarray, feature: np.ndarray,
                   threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
                   missing_left: np.ndarray, value: np.ndarray, baseline: float,
                   depth: int) -> TreeEnsemble:
        """Trees given one after another as node columns, children indexed within each tree."""
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        offset = np.repeat(roots, sizes)
        own = np.arange(len(leaf), dtype=np.int32)
        return cls(
            feature=np.where(leaf, 0, feature).astype(np.int32),
            threshold=np.where(leaf, np.inf, threshold).astype(np.float64),
            left=np.where(leaf, own, left + offset).astype(np.int32),
            right=np.where(leaf, own, right + offset).astype(np.int32),
            missing_left=np.where(leaf, True, missing_left).astype(bool),
            value=np.where(leaf, value, 0.0).astype(np.float64),
            roots=roots, baseline=baseline, depth=depth,
        )

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Raw log-odds for rows x (n, d); NaN follows each split's learned missing side."""
        x = np.atleast_2d(x)
        if x.shape[0] == 1:
            return np.array([self._raw_one(x[0])])
        rows = np.arange(x.shape[0])[:, None]
        node = np.broadcast_to(self.roots, (x.shape[0], len(self.roots)))
        for _ in range(self.depth):
            values = x[rows, self.feature[node]]
            go_left = values <= self.threshold[node]
            nan = np.isnan(values)
            if nan.any():
                go_left = np.where(nan, self.missing_left[node], go_left)
            node = np.where(go_left, self.left[node], self.right[node])
        return self.value[node].sum(axis=1) + self.baseline

    def _raw_one(self, x: np.ndarray) -> float:
        """One row (the serving case): decide every split at once, then follow the decisions
        down each tree (two 1-d gathers per level)."""
        children, twice = self._flat_children
        values = x.take(self.feature)
        go_left = values <= self.threshold  # NaN compares False
        nan = np.isnan(values)
        if nan.any():
            go_left |= nan & self.missing_left
        step = twice + go_left  # index of each node's chosen child in `children`
        node = self.roots
        for _ in range(self.depth):
            node = children.take(step.take(node))
        return float(self.value.take(node).sum() + self.baseline)

    @property
    def _flat_children(self) -> tuple[np.ndarray, np.ndarray]:
        """[right, left] child of every node, flattened, and 2 * node index; built once."""
        cached = self.__dict__.get("_children_cache")
        if cached is None:
            children = np.stack([self.right, self.left], axis=1).ravel().astype(np.intp)
            cached = (children, 2 * np.arange(len(self.feature), dtype=np.intp))
            object.__setattr__(self, "_children_cache", cached)
        return cached

    _FIELDS = ("feature", "threshold", "left", "right", "missing_left", "value", "roots")

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}{name}": getattr(self, name) for name in self._FIELDS}
        arrays[f"{prefix}scalars"] = np.array([self.baseline, self.depth], dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> TreeEnsemble:
        baseline, depth = arrays[f"{prefix}scalars"]
        parts = {name: arrays[f"{prefix}{name}"] for name in cls._FIELDS}
        n = len(parts["feature"])
        if any(len(parts[f]) != n for f in cls._FIELDS[:-1]) or n == 0:
            raise ValueError("tree arrays differ in length")
        for name in ("left", "right", "roots"):
            if parts[name].min() < 0 or parts[name].max() >= n:
                raise ValueError(f"tree {name} index out of range")
        return cls(**parts, baseline=float(baseline), depth=int(depth))


# What `TreeEnsemble.from_treelite` accepts (treelite's serialization format v4 enums):
# binary classification (task 0), float64 thresholds and leaves (type 3), one output per tree.
_TREELITE_HEADER = {"major_ver": [4], "task_type": [0], "threshold_type": [3],
                    "leaf_output_type": [3], "num_target": [1], "num_class": [1],
                    "leaf_vector_shape": [1, 1], "average_tree_output": [0]}
_LEAF, _NUMERICAL, _LESS_EQUAL = 0, 1, 3  # node types and the `<=` comparison


def _treelite_tree(tree, number: int) -> tuple[dict[str, np.ndarray], int]:
    """One tree's `from_nodes` columns and its depth; anything else fails loudly."""
    kind = tree.get_field("node_type")
    leaf = kind == _LEAF
    where = f"tree model: tree {number}"
    if tree.get_field("has_categorical_split")[0] or not np.isin(kind, (_LEAF, _NUMERICAL)).all():
        raise ValueError(f"{where} has categorical splits")
    if (tree.get_field("cmp")[~leaf] != _LESS_EQUAL).any():
        raise ValueError(f"{where} has a split other than x <= threshold")
    if tree.get_field("leaf_vector").size:
        raise ValueError(f"{where} has vector leaves")
    left, right = tree.get_field("cleft"), tree.get_field("cright")
    children = np.concatenate([left[~leaf], right[~leaf]])
    if (children <= 0).any() or (children >= len(kind)).any() or \
            len(set(children.tolist())) != len(children):
        raise ValueError(f"{where} is not a tree rooted at node 0")
    depth, level, seen = 0, np.array([0]), 1
    while True:
        splits = level[~leaf[level]]
        level = np.concatenate([left[splits], right[splits]])
        if not len(level):
            break
        depth, seen = depth + 1, seen + len(level)
    if seen != len(kind):
        raise ValueError(f"{where} is not a tree rooted at node 0")
    return {"leaf": leaf, "feature": tree.get_field("split_index"),
            "threshold": tree.get_field("threshold").astype(np.float64),
            "left": left, "right": right,
            "missing_left": tree.get_field("default_left").astype(bool),
            "value": tree.get_field("leaf_value").astype(np.float64)}, depth

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
    """Embedding and lexical logits + hand features -> trees -> calibrated probability.

    `columns` index the hand-feature row (see `router.features.FEATURE_NAMES`); the embedding
    logit and then the lexical logit are appended as the last tree inputs when set.
    """

    columns: np.ndarray  # int32 indices into the hand-feature row
    linear: LinearPart | None
    trees: TreeEnsemble | None
    calibrator: PlattCalibrator
    lexical: LexicalPart | None = None

    def tree_input(
        self, hand: np.ndarray, embedding: np.ndarray | None, prompts: list[str] | None = None
    ) -> np.ndarray:
        hand = np.atleast_2d(hand)
        logits = self.stacked_logits(embedding, prompts, len(hand))
        return np.hstack([hand[:, self.columns], logits])

    def stacked_logits(
        self, embedding: np.ndarray | None, prompts: list[str] | None, n: int = 1
    ) -> np.ndarray:
        """(n, k): the embedding and then the lexical logit of each prompt, as the trees see them
        after the hand features. They depend on the prompt alone, so a request can compute them
        once for both scorers when the two models share these parts."""
        parts = []
        if self.linear is not None:
            if embedding is None:
                raise ValueError("this model needs the prompt embedding")
            parts.append(self.linear.logit(np.atleast_2d(embedding)))
        if self.lexical is not None:
            if prompts is None:
                raise ValueError("this model needs the prompt text")
            parts.append(self.lexical.logit(prompts))
        return np.stack(parts, axis=1) if parts else np.zeros((n, 0))

    def predict_one(self, hand: np.ndarray, logits: np.ndarray) -> float:
        """`predict` for one hand-feature row (1-d) given its prompt's `stacked_logits` row."""
        x = np.concatenate((hand[self.columns], logits))
        raw = self.trees._raw_one(x) if self.trees is not None else x[-1]
        return float(self.calibrator(np.array([raw]))[0])

    def raw(self, hand: np.ndarray, embedding: np.ndarray | None, prompts=None) -> np.ndarray:
        x = self.tree_input(hand, embedding, prompts)
        return self.trees.raw(x) if self.trees is not None else x[:, -1]

    def predict(
        self, hand: np.ndarray, embedding: np.ndarray | None, prompts: list[str] | None = None
    ) -> np.ndarray:
        """Calibrated probabilities that the small answer is good enough, shape (n,)."""
        return self.calibrator(self.raw(hand, embedding, prompts))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {
            f"{prefix}columns": self.columns,
            f"{prefix}platt": np.array([self.calibrator.a, self.calibrator.b]),
        }
        if self.linear is not None:
            arrays.update(self.linear.to_arrays(f"{prefix}linear_"))
        if self.lexical is not None:
            arrays.update(self.lexical.to_arrays(f"{prefix}lexical_"))
        if self.trees is not None:
            arrays.update(self.trees.to_arrays(f"{prefix}trees_"))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> StackedModel:
        def has(part: str) -> bool:
            return any(k.startswith(f"{prefix}{part}_") for k in arrays)

        a, b = arrays[f"{prefix}platt"]
        return cls(
            columns=arrays[f"{prefix}columns"].astype(np.int32),
            linear=LinearPart.from_arrays(arrays, f"{prefix}linear_") if has("linear") else None,
            trees=TreeEnsemble.from_arrays(arrays, f"{prefix}trees_") if has("trees") else None,
            calibrator=PlattCalibrator(float(a), float(b)),
            lexical=(LexicalPart.from_arrays(arrays, f"{prefix}lexical_") if has("lexical")
                     else None),
        )
