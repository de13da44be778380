"""Fit the difficulty and confidence models from labelled outcome rows.

Both models predict one label: the small model's answer was good enough, i.e. its score was
within `tolerance` of the large model's (escalating would not have improved the answer). The
difficulty model sees the prompt only; the confidence model also sees the small answer (and its
token logprobs when the rows carry them). Stacking and calibration are cross-fitted inside the
training rows, grouped by prompt, so no prompt's label leaks into its own features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from router import lexical
from router.calibrate import Thresholds, choose_thresholds
from router.data import EmbeddingCache, default_cache_dir
from router.embedding import Embedder
from router.features import (
    ANSWER_FEATURES,
    CONSISTENCY_FEATURES,
    FEATURE_NAMES,
    LOGPROB_FEATURES,
    PROMPT_FEATURES,
    feature_row,
)
from router.lexical import LexicalPart
from router.models import LinearPart, PlattCalibrator, StackedModel, TreeEnsemble
from router.progress import progress

__all__ = [
    "DIFFICULTY_FEATURES",
    "Matrices",
    "TrainConfig",
    "TrainedModels",
    "build_matrices",
    "fit",
    "labels",
    "prompt_folds",
]


# The prompt hand features the difficulty model reads: all but the shares of digits and capital
# letters, which measure how a benchmark is typeset more than how hard a prompt is. Trained on
# MMLU-Pro, trees that read them fell to 0.531-0.563 APGR on RouteLLM MMLU over three training
# seeds, against 0.568-0.583 without (cross-fitted RouteLLM MMLU: 0.653 with, 0.650 without). The
# confidence model keeps them (cross-fitted GSM8K 0.783 with, 0.777 without).
DIFFICULTY_FEATURES = tuple(n for n in PROMPT_FEATURES if n not in ("p_digit_frac",
                                                                     "p_upper_frac"))


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs (recorded in the bundle)."""

    tolerance: float = 0.05  # good enough: small_score >= large_score - tolerance
    label: str = "good_enough"  # or "small_correct": small_score >= 0.5
    linear_c: float = 0.5
    lexical_c: float = 1.0  # 0 turns the hashed n-gram model off
    max_iter: int = 200
    learning_rate: float = 0.075
    max_leaf_nodes: int = 15
    max_depth: int = 6  # bounds the serving cost: one vectorised step per level
    min_samples_leaf: int = 40
    l2_regularization: float = 1.0
    inner_folds: int = 4
    seed: int = 0
    use_logprobs: bool = True  # use logprob features when the rows carry them
    use_samples: bool = True  # use self-consistency features when the rows carry samples
    balance_power: float = 0.5  # tree row weight ~ source size ** -power (1: sources equal)
    difficulty_hand: bool = True  # `DIFFICULTY_FEATURES` in the difficulty model
    # How much rows where neither model was right weigh in fitting each part (calibration always
    # sees them all). Their "good enough" is an accident of both failing. In the difficulty
    # model's linear parts it teaches that hard prompts are easy, which does not carry to a
    # benchmark whose large model is stronger (transfer from MMLU-Pro to RouteLLM MMLU, training
    # seeds 0 / 1 / 2: 0.573 / 0.568 / 0.583 without them, 0.535 / 0.561 / 0.528 with). In its
    # trees it teaches, within a benchmark, that a prompt nobody answers is not worth escalating
    # (cross-fitted RouteLLM MMLU: 0.650 with them, 0.633 without). In the confidence trees it
    # hides which answers are wrong, while the confidence model's prompt-only linear parts fit
    # best on every row (cross-fitted GSM8K 0.783 against 0.771).
    neither_right_difficulty_linear: float = 0.0
    neither_right_difficulty_trees: float = 1.0
    neither_right_confidence_linear: float = 1.0
    neither_right_confidence_trees: float = 0.0


@dataclass
class Matrices:
    """Model inputs for a set of rows: hand features, prompt embeddings, outcomes."""

    hand: np.ndarray  # (n, len(FEATURE_NAMES)), NaN where not computable
    embedding: np.ndarray  # (n, 384) float32
    small: np.ndarray  # small_score
    large: np.ndarray  # large_score
    has_answer: np.ndarray  # bool
    prompts: list[str]
    datasets: list[str] = field(default_factory=list)

    def subset(self, mask: np.ndarray) -> Matrices:
        index = np.nonzero(mask)[0]
        return Matrices(
            self.hand[index], self.embedding[index], self.small[index], self.large[index],
            self.has_answer[index], [self.prompts[i] for i in index],
            [self.datasets[i] for i in index] if self.datasets else [],
        )


@dataclass(frozen=True)
class TrainedModels:
    """Fitted models plus the thresholds suggested by their out-of-fold scores."""

    difficulty: StackedModel
    confidence: StackedModel | None
    config: TrainConfig
    feature_groups: dict[str, list[str]]
    thresholds: Thresholds
    notes: tuple[str, ...] = ()  # what the data did not allow, one line each

    @property
    def skip_threshold(self) -> float:
        return self.thresholds.skip_threshold


def labels(small: np.ndarray, large: np.ndarray, tolerance: float) -> np.ndarray:
    """1 where the small answer was good enough (escalating would not have helped)."""
    return (np.asarray(small) >= np.asarray(large) - tolerance).astype(np.int64)


def training_labels(m: Matrices, config: TrainConfig) -> np.ndarray:
    """The label the models learn (see `TrainConfig.label`)."""
    if config.label == "small_correct":
        return (m.small >= 0.5).astype(np.int64)
    return labels(m.small, m.large, config.tolerance)


def prompt_folds(prompts: list[str], k: int, salt: str = "outer") -> np.ndarray:
    """Fold index per row from a hash of the prompt: the same prompt is always in one fold."""
    return np.array([
        int.from_bytes(hashlib.sha256(f"{salt}\0{p}".encode()).digest()[:4], "big") % k
        for p in prompts
    ])


def build_matrices(frame, cache_dir: Path | None = None, threads: int = 1) -> Matrices:
    """Embed prompts (through the disk cache) and extract hand features for every row."""
    embedder = Embedder(intra_op_threads=threads)  # loaded first: its graph keys the cache
    cache = EmbeddingCache(cache_dir or default_cache_dir(), embedder.vectors_id)
    prompts = frame["prompt"].tolist()
    embedding = cache.get_many(prompts, embedder.embed,
                               progress=lambda b: progress(b, "embedding"))
    logprobs = frame["small_logprobs"].tolist()
    samples = frame["small_samples"].tolist() if "small_samples" in frame else [None] * len(prompts)
    rows = zip(prompts, frame["small_response"].tolist(), logprobs, samples, strict=True)
    hand = np.stack([
        feature_row(p, a if isinstance(a, str) else None, _as_list(lp), None, _texts(s))
        for p, a, lp, s in progress(rows, "features", total=len(prompts))
    ]) if prompts else np.zeros((0, len(FEATURE_NAMES)))
    return Matrices(
        hand=hand,
        embedding=embedding.astype(np.float32),
        small=frame["small_score"].to_numpy(dtype=np.float64),
        large=frame["large_score"].to_numpy(dtype=np.float64),
        has_answer=frame["small_response"].map(lambda a: isinstance(a, str)).to_numpy(bool),
        prompts=prompts,
        datasets=frame["dataset"].astype(str).tolist(),
    )


def _as_list(value) -> list[float] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return [float(v) for v in value] or None


def _texts(value) -> list[str] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return [v for v in value if isinstance(v, str)] or None


def _columns(names: tuple[str, ...]) -> np.ndarray:
    return np.array([FEATURE_NAMES.index(n) for n in names], dtype=np.int32)


def _informative(hand: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Drop columns with fewer than two distinct finite values in the training rows."""
    keep = [c for c in columns if len(np.unique(hand[np.isfinite(hand[:, c]), c])) >= 2]
    return np.array(keep, dtype=np.int32)


def _fit_linear(x: np.ndarray, y: np.ndarray, config: TrainConfig,
                weights: np.ndarray | None = None) -> LinearPart:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=config.linear_c, max_iter=500).fit(x, y, sample_weight=weights)
    return LinearPart(model.coef_[0].astype(np.float64), float(model.intercept_[0]))


def source_weights(sources: list[str], power: float) -> np.ndarray:
    """Row weights ~ (rows of its source) ** -power, averaging 1: small sources count more."""
    _, index, counts = np.unique(np.array(sources), return_inverse=True, return_counts=True)
    weights = counts.astype(np.float64)[index] ** -power
    return weights / weights.mean()


def _fit_trees(
    x: np.ndarray, y: np.ndarray, config: TrainConfig, weights: np.ndarray | None = None
) -> TreeEnsemble:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=config.max_iter, learning_rate=config.learning_rate,
        max_leaf_nodes=config.max_leaf_nodes, max_depth=config.max_depth,
        min_samples_leaf=config.min_samples_leaf,
        l2_regularization=config.l2_regularization, early_stopping=False,
        categorical_features=None, random_state=config.seed,
    ).fit(x, y, sample_weight=weights)
    return TreeEnsemble.from_sklearn(model)


def _fit_lexical(tf, y: np.ndarray, config: TrainConfig,
                 weights: np.ndarray | None = None) -> LexicalPart:
    from sklearn.linear_model import LogisticRegression

    idf = lexical.fit_idf(tf)
    model = LogisticRegression(C=config.lexical_c, max_iter=1000).fit(
        lexical.weigh(tf, idf), y, sample_weight=weights)
    return LexicalPart(model.coef_[0].astype(np.float32), float(model.intercept_[0]), idf)


def _oof_logits(
    m: Matrices, y: np.ndarray, folds: np.ndarray, config: TrainConfig, weights: np.ndarray,
    tf,
) -> tuple[np.ndarray, LinearPart, LexicalPart | None]:
    """Out-of-fold embedding (and lexical, from `tf`, the prompts' `lexical.matrix` or None)
    logits, so the trees learn how far to trust them; plus the final logistic models fitted
    on all rows."""
    out = np.zeros((len(y), 2 if tf is not None else 1))
    for k in progress(range(config.inner_folds), "logit folds"):
        held = folds == k
        if held.all() or not held.any() or len(np.unique(y[~held])) < 2:
            continue
        out[held, 0] = _fit_linear(m.embedding[~held], y[~held], config,
                                   weights[~held]).logit(m.embedding[held])
        if tf is not None:
            part = _fit_lexical(tf[~held], y[~held], config, weights[~held])
            out[held, 1] = lexical.weigh(tf[held], part.idf) @ part.weights + part.intercept
    linear = _fit_linear(m.embedding, y, config, weights)
    lexical_part = _fit_lexical(tf, y, config, weights) if tf is not None else None
    return out, linear, lexical_part


def _fit_stacked(
    hand: np.ndarray, logits: np.ndarray, y: np.ndarray, folds: np.ndarray,
    columns: np.ndarray, parts: tuple[LinearPart, LexicalPart | None], config: TrainConfig,
    name: str, weights: np.ndarray | None = None,
) -> tuple[StackedModel, np.ndarray]:
    """Fit trees on hand features + the stacked logits; also return out-of-fold probabilities."""
    columns = _informative(hand, columns)
    x = np.hstack([hand[:, columns], logits])
    oof = np.zeros(len(y))
    for k in progress(range(config.inner_folds), f"{name} folds"):
        held = folds == k
        if held.all() or not held.any() or len(np.unique(y[~held])) < 2:
            continue
        w = weights[~held] if weights is not None else None
        oof[held] = _fit_trees(x[~held], y[~held], config, w).raw(x[held])
    calibrator = PlattCalibrator.fit(oof, y)  # on the natural mix, unweighted
    trees = _fit_trees(x, y, config, weights)
    model = StackedModel(columns, parts[0], trees, calibrator, parts[1])
    return model, calibrator(oof)


def _groups_used(m: Matrices, config: TrainConfig, y: np.ndarray) -> dict[str, list[str]]:
    answer_rows = m.hand[m.has_answer]

    def carried(name: str) -> bool:  # by more than half the rows with an answer
        return bool(answer_rows.size) and np.isfinite(
            answer_rows[:, FEATURE_NAMES.index(name)]).mean() > 0.5

    confidence = list(PROMPT_FEATURES + ANSWER_FEATURES)
    if config.use_logprobs and carried("lp_mean"):
        confidence += list(LOGPROB_FEATURES)
    if config.use_samples and carried("sc_agree"):
        confidence += list(CONSISTENCY_FEATURES)
    stacked = ["prompt_embedding", "prompt_ngrams"] if config.lexical_c > 0 else [
        "prompt_embedding"]
    return {"difficulty": [*stacked, *(DIFFICULTY_FEATURES if config.difficulty_hand else ())],
            "confidence": [*stacked, *confidence] if _both_outcomes(y[m.has_answer]) else []}


def _both_outcomes(y: np.ndarray) -> bool:
    return len(np.unique(y)) >= 2


def fit(m: Matrices, config: TrainConfig | None = None) -> TrainedModels:
    """Train both models on all rows of `m` (confidence only on rows with an answer)."""
    config = config or TrainConfig()
    y = training_labels(m, config)
    if not _both_outcomes(y):
        raise ValueError(f"all {len(y)} training rows have the same outcome (the small answer "
                         "good enough, or not, everywhere): a router needs rows of both")
    folds = prompt_folds(m.prompts, config.inner_folds, salt=f"inner{config.seed}")
    neither = np.maximum(m.small, m.large) < 0.5
    sources = source_weights(m.datasets, config.balance_power) if m.datasets else 1.0

    def weights(weight: float) -> np.ndarray:
        return np.where(neither, weight, 1.0)

    tf = lexical.matrix(m.prompts) if config.lexical_c > 0 else None
    logits, linear, lexical_part = _oof_logits(
        m, y, folds, config, weights(config.neither_right_difficulty_linear), tf)
    groups = _groups_used(m, config, y)
    notes = () if groups["confidence"] or not m.has_answer.any() else (
        "no confidence model: the rows with a small answer all have the same outcome",)
    hand_columns = _columns(DIFFICULTY_FEATURES if config.difficulty_hand else ())
    difficulty, oof_d = _fit_stacked(
        m.hand, logits, y, folds, hand_columns, (linear, lexical_part), config, "difficulty",
        weights(config.neither_right_difficulty_trees) * sources)
    confidence, oof_c = None, None
    rows = m.has_answer
    if groups["confidence"]:
        if config.neither_right_confidence_linear != config.neither_right_difficulty_linear:
            logits, linear, lexical_part = _oof_logits(
                m, y, folds, config, weights(config.neither_right_confidence_linear), tf)
        columns = _columns(tuple(n for n in groups["confidence"] if n in FEATURE_NAMES))
        tree_weights = weights(config.neither_right_confidence_trees) * sources
        confidence, oof_c = _fit_stacked(m.hand[rows], logits[rows], y[rows], folds[rows],
                                         columns, (linear, lexical_part), config, "confidence",
                                         tree_weights[rows])
    if oof_c is None:
        thresholds = choose_thresholds(oof_d, None, m.small, m.large, target_quality=0.95)
    else:
        thresholds = choose_thresholds(oof_d[rows], oof_c, m.small[rows], m.large[rows],
                                       target_quality=0.95)
    return TrainedModels(difficulty, confidence, config, groups, thresholds, notes)
