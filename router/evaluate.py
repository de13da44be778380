"""Evaluate routers: per dataset and mode, ranking, calibration and RouteLLM routing metrics.

Modes: `difficulty` (route on the prompt alone), `confidence` (small answer first, then
escalate on the confidence score), `combined` (skip the small model below the difficulty skip
threshold, otherwise the confidence score decides), the peers `baseline_litellm_complexity`
(LiteLLM's rule-based complexity router, its default heuristic, where litellm is installed:
a score, not a probability, so no calibration error) and, when the evaluation trains its own
models, `baseline_tfidf` (prompt-only TF-IDF + logistic regression on the same folds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from router import metrics
from router.train import Matrices, TrainConfig, fit, labels, prompt_folds, training_labels

__all__ = [
    "Predictions",
    "combined_scores",
    "crossfit",
    "dataset_report",
    "plot_curves",
    "predict",
    "transfer",
]

MODES = ("difficulty", "confidence", "combined", "baseline_tfidf")


@dataclass
class Predictions:
    """Per-row probabilities (NaN where a mode does not apply) and the skip threshold used."""

    difficulty: np.ndarray
    confidence: np.ndarray
    baseline_tfidf: np.ndarray | None = None
    baseline_litellm_complexity: np.ndarray | None = None
    skip_threshold: float | np.ndarray = 0.0  # per row when folds chose their own
    notes: list[str] = field(default_factory=list)  # what the data did not allow

    def skip_at(self, rows: np.ndarray) -> float | np.ndarray:
        skip = self.skip_threshold
        return skip[rows] if isinstance(skip, np.ndarray) else skip


def combined_scores(difficulty: np.ndarray, confidence: np.ndarray, skip: float) -> np.ndarray:
    """One ranking for the combined cascade: skipped prompts first (by difficulty), then by
    confidence. Scores below 0 mark the skipped prompts."""
    return np.where(difficulty < skip, difficulty - 1.0, confidence)


def predict(models, m: Matrices) -> Predictions:
    """Apply fitted models (`TrainedModels` or a loaded bundle's models) to rows."""
    difficulty = models.difficulty.predict(m.hand, m.embedding, m.prompts)
    confidence = np.full(len(difficulty), np.nan)
    if models.confidence is not None and m.has_answer.any():
        rows = m.has_answer
        prompts = [p for p, has in zip(m.prompts, rows, strict=True) if has]
        confidence[rows] = models.confidence.predict(m.hand[rows], m.embedding[rows], prompts)
    return Predictions(difficulty, confidence, skip_threshold=getattr(models, "skip_threshold", 0))


def _tfidf_baseline(train_prompts: list[str], y: np.ndarray, test_prompts: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000,
                                 sublinear_tf=True)
    x = vectorizer.fit_transform(train_prompts)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    return model.predict_proba(vectorizer.transform(test_prompts))[:, 1]


def litellm_complexity(prompts: list[str]) -> np.ndarray | None:
    """LiteLLM's rule-based complexity router (its default heuristic scorer) as a keep-small
    score: the negated complexity. None where litellm is not installed."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
    try:
        from litellm.router_strategy.complexity_router.complexity_router import (
            ComplexityRouter,
        )
    except ImportError:
        return None
    router = ComplexityRouter("baseline", ctx=None, derive_savings_baseline=False)
    return -np.array([router.classify(prompt)[1] for prompt in prompts])


def transfer(train: Matrices, test: Matrices, config: TrainConfig) -> Predictions:
    """Train on one set of rows, predict another (with the TF-IDF baseline alongside)."""
    models = fit(train, config)
    out = predict(models, test)
    y = training_labels(train, config)
    out.baseline_tfidf = _tfidf_baseline(train.prompts, y, test.prompts)
    if test.has_answer.any() and models.confidence is None:
        out.notes.append(f"no confidence model: {int(train.has_answer.sum())} training rows "
                         "with a small answer (it needs answered rows of both outcomes)")
    return out


def crossfit(m: Matrices, config: TrainConfig, k: int, progress=None) -> Predictions:
    """Out-of-fold predictions for every row, folds split by prompt.

    Each fold's rows use the skip threshold its own model chose.
    """
    folds = prompt_folds(m.prompts, k)
    out = Predictions(*(np.full(len(folds), np.nan) for _ in range(3)))
    out.skip_threshold = np.zeros(len(folds))
    for fold in progress(range(k), "cross-fit folds") if progress else range(k):
        held = folds == fold
        if not held.any():
            continue
        try:
            part = transfer(m.subset(~held), m.subset(held), config)
        except ValueError as exc:
            raise ValueError(f"cross-fit fold {fold + 1} of {k}: {exc}; try fewer folds or "
                             "more rows") from exc
        out.notes += [f"fold {fold + 1} of {k}: {note}" for note in part.notes]
        out.difficulty[held], out.confidence[held] = part.difficulty, part.confidence
        out.baseline_tfidf[held] = part.baseline_tfidf
        out.skip_threshold[held] = part.skip_threshold
    return out


def _mode_metrics(
    probs: np.ndarray, ranking: np.ndarray, small: np.ndarray, large: np.ndarray,
    y: np.ndarray, price_ratio: float, skipped_share: float,
) -> dict[str, float]:
    curve = metrics.quality_curve(ranking, small, large)
    return {
        "roc_auc": metrics.roc_auc(y, probs),
        "calibration_error": metrics.expected_calibration_error(y, probs),
        "apgr": metrics.apgr(curve),
        "cpt_50": metrics.cpt(curve, 0.5),
        "cpt_80": metrics.cpt(curve, 0.8),
        "small_share_at_95": metrics.small_share_at_quality(curve, 0.95),
        "cost_at_95": metrics.cost_at_quality(curve, 0.95, price_ratio, skipped_share),
        "price_ratio": price_ratio,
    }


def _mode_scores(p: Predictions, rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mode -> (probability for AUC/ECE, ranking score) on `rows`, for the modes that apply."""
    out = {"difficulty": (p.difficulty[rows], p.difficulty[rows])}
    if np.isfinite(p.confidence[rows]).all():
        out["confidence"] = (p.confidence[rows], p.confidence[rows])
        combined = combined_scores(p.difficulty[rows], p.confidence[rows], p.skip_at(rows))
        out["combined"] = (np.where(combined < 0, p.difficulty[rows], combined), combined)
    for mode in ("baseline_tfidf", "baseline_litellm_complexity"):
        scores = getattr(p, mode)
        if scores is not None:
            out[mode] = (scores[rows], scores[rows])
    return out


def dataset_report(
    p: Predictions, m: Matrices, rows: np.ndarray, tolerance: float, price_ratio: float
) -> dict[str, dict[str, float]]:
    """dataset's metrics: mode -> metric name -> value, plus random and oracle references."""
    small, large = m.small[rows], m.large[rows]
    y = labels(small, large, tolerance)
    report = {}
    for mode, (probs, ranking) in _mode_scores(p, rows).items():
        skipped = {"confidence": 0.0, "combined": float((ranking < 0).mean())}.get(mode, 1.0)
        report[mode] = _mode_metrics(probs, ranking, small, large, y, price_ratio, skipped)
        if mode == "baseline_litellm_complexity":
            report[mode]["calibration_error"] = float("nan")  # a score, not a probability
        if mode == "combined":
            report[mode]["skip_rate"] = float((ranking < 0).mean())
            report[mode]["skip_threshold"] = float(np.mean(p.skip_at(rows)))
    for name, ranking in (("random", np.zeros(len(small))),
                          ("oracle", metrics.oracle_scores(small, large))):
        curve = metrics.quality_curve(ranking, small, large)
        report[name] = {"apgr": metrics.apgr(curve), "cpt_50": metrics.cpt(curve, 0.5),
                        "cpt_80": metrics.cpt(curve, 0.8),
                        "small_share_at_95": metrics.small_share_at_quality(curve, 0.95)}
    report["summary"] = {"rows": int(rows.sum()), "q_small": float(small.mean()),
                         "q_large": float(large.mean()), "good_enough_rate": float(y.mean())}
    return report


def plot_curves(p: Predictions, m: Matrices, rows: np.ndarray, title: str, path) -> None:
    """PNG of quality vs escalation rate per mode, with the random and oracle routers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small, large = m.small[rows], m.large[rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    curves = {mode: ranking for mode, (_, ranking) in _mode_scores(p, rows).items()}
    curves["oracle"] = metrics.oracle_scores(small, large)
    curves["random"] = np.zeros(len(small))
    for mode, ranking in curves.items():
        curve = metrics.quality_curve(ranking, small, large)
        style = {"random": ":", "oracle": "--"}.get(mode, "-")
        label = f"{mode} (APGR {metrics.apgr(curve):.3f})"
        ax.plot(curve.escalated, curve.quality, style, label=label)
    ax.axhline(0.95 * large.mean(), color="grey", lw=0.8, alpha=0.6, label="95% of large")
    ax.set_xlabel("share escalated to the large model")
    ax.set_ylabel("mean quality")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
