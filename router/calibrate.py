"""Choose the cascade's thresholds from labelled data and write them into a policy file.

The combined cascade skips the small model when the difficulty score is below
`difficulty.skip_threshold`, and otherwise escalates a small answer whose confidence score is
below `confidence.threshold`. The skip threshold is set where the confidence rule would have
escalated nearly every answer anyway (skipping then changes few decisions and saves the small
calls); the confidence threshold meets a quality target or an escalation budget on the data.
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
    difficulty: np.ndarray, accepted: np.ndarray, max_accept_rate: float, max_skip: float
) -> float:
    """Largest difficulty threshold below which the confidence rule would have accepted at
    most `max_accept_rate` of the answers anyway: skipping those prompts changes few
    decisions and saves their small-model calls."""
    best = 0.0
    for q in np.linspace(0.01, max_skip, 30):
        t = float(np.quantile(difficulty, q))
        below = difficulty < t
        if below.any() and accepted[below].mean() <= max_accept_rate:
            best = t
    return best


def _cut(sorted_scores: np.ndarray, k: int) -> float:
    """A threshold that rejects exactly the k lowest of the sorted scores."""
    if k <= 0:
        return 0.0
    if k >= len(sorted_scores):
        return 1.0
    return float((sorted_scores[k - 1] + sorted_scores[k]) / 2.0)


def _operating_point(
    skip: np.ndarray, scores: np.ndarray, small: np.ndarray, large: np.ndarray,
    target_quality: float | None, max_escalation_rate: float | None,
) -> tuple[float, float, float]:
    """(score cut, quality relative to large, escalation rate) for the prompts not skipped."""
    order = np.nonzero(~skip)[0][np.argsort(scores[~skip], kind="stable")]
    base = large[skip].sum() + small[order].sum()
    quality = (base + np.concatenate([[0.0], np.cumsum((large - small)[order])])) / len(small)
    escalated = (skip.sum() + np.arange(len(order) + 1)) / len(small)
    if target_quality is not None:
        ok = np.nonzero(quality >= target_quality * large.mean() - 1e-12)[0]
        k = int(ok[0]) if ok.size else len(order)
    else:
        ok = np.nonzero(escalated <= max_escalation_rate + 1e-12)[0]
        k = int(ok[np.argmax(quality[ok])]) if ok.size else 0
    relative = float(quality[k] / large.mean()) if large.mean() else 1.0
    return _cut(scores[order], k), relative, float(escalated[k])


def choose_thresholds(
    difficulty: np.ndarray,
    confidence: np.ndarray | None,
    small: np.ndarray,
    large: np.ndarray,
    target_quality: float | None = None,
    max_escalation_rate: float | None = None,
    skip_max_accept_rate: float = 0.05,
    max_skip_rate: float = 0.2,
) -> Thresholds:
    """Thresholds meeting `target_quality` (of the large model's) or `max_escalation_rate`.

    First the confidence threshold alone; then the skip threshold where that rule would
    have escalated nearly everything anyway; then the confidence threshold again with the
    skip in place. Without confidence scores (no answers in the data) the difficulty score
    routes alone and the confidence threshold is 0 (accept every small answer).
    """
    if (target_quality is None) == (max_escalation_rate is None):
        raise ValueError("give exactly one of target_quality and max_escalation_rate")
    small, large = np.asarray(small, float), np.asarray(large, float)
    none = np.zeros(len(small), bool)
    goal = (target_quality, max_escalation_rate)
    if confidence is None:
        cut, quality, escalated = _operating_point(none, difficulty, small, large, *goal)
        return Thresholds(cut, 0.0, quality, escalated, escalated)
    cut, _, _ = _operating_point(none, confidence, small, large, *goal)
    t_skip = _skip_threshold(difficulty, confidence >= cut, skip_max_accept_rate, max_skip_rate)
    skip = difficulty < t_skip
    cut, quality, escalated = _operating_point(skip, confidence, small, large, *goal)
    return Thresholds(t_skip, cut, quality, escalated, float(skip.mean()))


def write_policy(policy: Path, thresholds: Thresholds, bundle: str, note: str = "") -> None:
    """Set the learned scorers, bundle and thresholds in a policy YAML, keeping its comments.

    Comments on other keys are kept as they are; an end-of-line comment on a key this
    rewrites would describe the old value, so it is replaced by one saying where the new
    value came from.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the operator's long lines
    path = Path(policy)
    data = yaml.load(path.read_text()) if path.exists() else CommentedMap()
    comment = "set by `router calibrate`" + (f" ({note})" if note else "")
    for section, key, value in (
        ("difficulty", "skip_threshold", thresholds.skip_threshold),
        ("confidence", "threshold", thresholds.confidence_threshold),
    ):
        if data.get(section) is None:
            data[section] = CommentedMap()
        part = data[section]
        part["scorer"] = "learned"
        part["bundle"] = bundle
        part[key] = round(float(value), 4)
        _replace_comment(part, "scorer", None)
        _replace_comment(part, key, comment)
    with path.open("w") as handle:
        yaml.dump(data, handle)


def _replace_comment(mapping, key: str, text: str | None) -> None:
    """Drop a key's end-of-line comment, then add `text` as its new one."""
    items = getattr(mapping, "ca", None)
    if items is not None and key in items.items:
        old = items.items[key][2]
        # keep the line break (and any full-line comments) the old token carried
        tail = old.value[old.value.index("\n"):] if old is not None and "\n" in old.value else ""
        items.items.pop(key)
        if tail.strip() or (tail and text is None):
            from ruamel.yaml.tokens import CommentToken

            mapping.ca.items[key] = [None, None, CommentToken(tail, old.start_mark, None), None]
    if text:
        mapping.yaml_add_eol_comment(text, key)
