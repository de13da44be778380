"""Routing quality metrics (RouteLLM definitions) and calibration error.

A router score is the probability that the small model's answer is good enough: prompts are
escalated to the large model lowest score first. Ties are broken by expectation (as if at
random), so a constant router scores exactly like the random router.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Curve",
    "apgr",
    "cost_at_quality",
    "cpt",
    "expected_calibration_error",
    "oracle_scores",
    "quality_curve",
    "roc_auc",
    "small_share_at_quality",
]


@dataclass(frozen=True)
class Curve:
    """Quality y and PGR after escalating the k lowest-scored prompts, k = 0..n."""

    escalated: np.ndarray  # fraction x of prompts sent to the large model
    quality: np.ndarray  # mean score of the chosen model's answers
    pgr: np.ndarray
    q_small: float
    q_large: float


def quality_curve(scores: np.ndarray, small: np.ndarray, large: np.ndarray) -> Curve:
    """The quality-vs-escalation curve of a router (ties spread evenly, as in expectation)."""
    scores, small, large = (np.asarray(a, dtype=np.float64) for a in (scores, small, large))
    n = len(scores)
    order = np.argsort(scores, kind="stable")
    gains = (large - small)[order]
    _, starts, counts = np.unique(scores[order], return_index=True, return_counts=True)
    group_sums = np.add.reduceat(gains, starts) if n else gains
    gains = np.repeat(group_sums / counts, counts)
    quality = (small.sum() + np.concatenate([[0.0], np.cumsum(gains)])) / max(n, 1)
    q_small, q_large = float(small.mean()), float(large.mean())
    span = q_large - q_small
    pgr = (quality - q_small) / span if span else np.zeros_like(quality)
    return Curve(np.arange(n + 1) / max(n, 1), quality, pgr, q_small, q_large)


def apgr(curve: Curve) -> float:
    """Area under PGR(x) for x in [0, 1] (0.5 for a random router)."""
    return float(np.trapezoid(curve.pgr, curve.escalated))


def cpt(curve: Curve, target: float) -> float:
    """Smallest escalated fraction x with PGR(x) >= target (1.0 if never reached)."""
    hit = np.nonzero(curve.pgr >= target - 1e-12)[0]
    return float(curve.escalated[hit[0]]) if hit.size else 1.0


def small_share_at_quality(curve: Curve, fraction: float = 0.95) -> float:
    """Largest share served by small while quality >= `fraction` of the large model's."""
    hit = np.nonzero(curve.quality >= fraction * curve.q_large - 1e-12)[0]
    return float(1.0 - curve.escalated[hit[0]]) if hit.size else 0.0


def cost_at_quality(
    curve: Curve,
    fraction: float = 0.95,
    price_ratio: float = 20.0,
    skipped_share: float = 0.0,
) -> float:
    """Cost at that operating point relative to sending everything to the large model.

    A small call costs 1/price_ratio of a large one. Escalated prompts are taken from the
    skipped ones first (up to `skipped_share`): those never paid for a small call. Prompt-only
    routing skips every escalated prompt (1.0); a confidence cascade skips none (0.0).
    """
    escalated = 1.0 - small_share_at_quality(curve, fraction)
    small_calls = 1.0 - min(escalated, skipped_share)
    return float(escalated + small_calls / price_ratio)


def oracle_scores(small: np.ndarray, large: np.ndarray) -> np.ndarray:
    """The oracle router: escalate exactly where the large model is better, biggest gain first."""
    return -(np.asarray(large, dtype=np.float64) - np.asarray(small, dtype=np.float64))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of scores against binary labels (ties count half); NaN with one class."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mean_ranks = starts + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_ranks, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-width probability bins, weighted by bin size."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if not len(probs):
        return float("nan")
    index = np.minimum((probs * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            error += mask.mean() * abs(labels[mask].mean() - probs[mask].mean())
    return float(error)
