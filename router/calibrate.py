"""Choose the cascade's thresholds from labelled data and write them into a policy file.

The combined cascade skips the small model when the difficulty score is below
`difficulty.skip_threshold`, and otherwise escalates a small answer whose confidence score is
below `confidence.threshold`. The skip threshold is set where the small model is rarely good
enough (skipping then costs almost no quality and saves the small call); the confidence
threshold then meets a quality target or an escalation budget on the data given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["Thresholds", "choose_thresholds", "write_policy"]


@dataclass(frozen=True)
class Thresholds:
    """The chosen thresholds and what they gave on the calibration data."""

    skip_threshold: float
    confidence_threshold: float
    quality: float  # mean quality served, relative to the large model's (1.0 = equal)
    escalation_rate: float  # share sent to the large model (skipped + escalated)
    skip_rate: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _skip_threshold(
    difficulty: np.ndarray, good: np.ndarray, max_good_rate: float, max_skip: float
) -> float:
    """Largest threshold whose skipped prompts were good enough at most `max_good_rate`."""
    best = 0.0
    for q in np.linspace(0.01, max_skip, 50):
        t = float(np.quantile(difficulty, q))
        below = difficulty < t
        if below.any() and good[below].mean() <= max_good_rate:
            best = t
    return best


def _cut(sorted_scores: np.ndarray, k: int) -> float:
    """A threshold that rejects exactly the k lowest of the sorted scores."""
    if k <= 0:
        return 0.0
    if k >= len(sorted_scores):
        return 1.0
    return float((sorted_scores[k - 1] + sorted_scores[k]) / 2.0)


def choose_thresholds(
    difficulty: np.ndarray,
    confidence: np.ndarray | None,
    small: np.ndarray,
    large: np.ndarray,
    target_quality: float | None = None,
    max_escalation_rate: float | None = None,
    tolerance: float = 0.05,
    skip_max_good_rate: float = 0.2,
    max_skip_rate: float = 0.3,
) -> Thresholds:
    """Thresholds meeting `target_quality` (of the large model's) or `max_escalation_rate`.

    Without confidence scores (no answers in the data) the difficulty score does the routing
    alone and the confidence threshold is 0 (accept every small answer).
    """
    if (target_quality is None) == (max_escalation_rate is None):
        raise ValueError("give exactly one of target_quality and max_escalation_rate")
    small, large = np.asarray(small, float), np.asarray(large, float)
    good = small >= large - tolerance
    if confidence is None:
        skip, rest_scores = np.zeros(len(small), bool), difficulty
    else:
        t_skip = _skip_threshold(difficulty, good, skip_max_good_rate, max_skip_rate)
        skip, rest_scores = difficulty < t_skip, confidence
    order = np.nonzero(~skip)[0][np.argsort(rest_scores[~skip], kind="stable")]
    base = large[skip].sum() + small[order].sum()
    quality = (base + np.concatenate([[0.0], np.cumsum((large - small)[order])])) / len(small)
    escalated = (skip.sum() + np.arange(len(order) + 1)) / len(small)
    if target_quality is not None:
        ok = np.nonzero(quality >= target_quality * large.mean() - 1e-12)[0]
        k = int(ok[0]) if ok.size else len(order)
    else:
        ok = np.nonzero(escalated <= max_escalation_rate + 1e-12)[0]
        k = int(ok[np.argmax(quality[ok])]) if ok.size else 0
    cut = _cut(rest_scores[order], k)
    skip_t = float(difficulty[skip].max() + 1e-6) if confidence is not None and skip.any() else 0.0
    if confidence is None:
        skip_t, cut = cut, 0.0
    return Thresholds(
        skip_threshold=min(skip_t, 1.0), confidence_threshold=cut,
        quality=float(quality[k] / large.mean()) if large.mean() else 1.0,
        escalation_rate=float(escalated[k]), skip_rate=float(skip.mean()),
    )


def write_policy(policy: Path, thresholds: Thresholds, bundle: str) -> None:
    """Set the learned scorers, bundle and thresholds in a policy YAML, keeping its comments."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()
    yaml.preserve_quotes = True
    path = Path(policy)
    data = yaml.load(path.read_text()) if path.exists() else CommentedMap()
    for section, key, value in (
        ("difficulty", "skip_threshold", thresholds.skip_threshold),
        ("confidence", "threshold", thresholds.confidence_threshold),
    ):
        if data.get(section) is None:
            data[section] = CommentedMap()
        data[section]["scorer"] = "learned"
        data[section]["bundle"] = bundle
        data[section][key] = round(float(value), 4)
    with path.open("w") as handle:
        yaml.dump(data, handle)
