"""Replay an outcomes file through the quality-target calibrator the gateway runs.

Each row becomes one request, in a seeded random order: below the calibrator's learned skip
threshold on its difficulty score it goes straight to the frontier (unless drawn to explore);
otherwise its score is the router's confidence in the small answer (the difficulty score
where the file has no answers), the calibrator's current threshold accepts or escalates it,
an escalation is labelled for free and an accepted request is labelled when the calibrator
draws it for a shadow call, with the label such a call would give (both models' scores from
the file). The same
`QualityTargets` object and calls serve live traffic (`gateway.learning`); only the clock is
simulated, at `rate` requests a second.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from router.quality import QualityTarget, QualityTargets

WINDOW = 500  # requests per reported window


@dataclass
class Stream:
    """The rows to replay: one score and both models' quality per request."""

    scores: np.ndarray
    small: np.ndarray
    large: np.ndarray
    segments: list[str]
    difficulty: np.ndarray | None = None  # per row, for the learned skip threshold


def replay(stream: Stream, spec: QualityTarget, seed: int = 0, rate: float = 10.0) -> dict:
    """Feed the stream through the calibrator; the report's quality is served / frontier."""
    order = request_order(len(stream.scores), seed)
    clock = {"now": 0.0}
    targets = QualityTargets(rng=random.Random(seed).random, clock=lambda: clock["now"])
    served = np.empty(len(order))
    kept = np.zeros(len(order), bool)
    skipped = np.zeros(len(order), bool)
    would_accept = 0  # skipped requests whose small answer the threshold would have accepted
    shadows = 0
    for step, row in enumerate(order):
        clock["now"] = step / rate
        calibrator = targets.calibrator("replay", stream.segments[row], spec)
        score, small, large = stream.scores[row], stream.small[row], stream.large[row]
        difficulty = None if stream.difficulty is None else float(stream.difficulty[row])
        tried, chance = calibrator.plan(difficulty)
        if not tried:
            skipped[step], served[step] = True, large
            would_accept += bool(score >= calibrator.threshold)
            continue
        kept[step] = score >= calibrator.threshold
        entry, shadow = calibrator.record(score, not kept[step], difficulty, chance)
        if not kept[step] or shadow:
            calibrator.label(entry, small, large, shadow=bool(kept[step]))
        shadows += bool(kept[step] and shadow)
        served[step] = small if kept[step] else large
    large_in_order = stream.large[order]
    starts = _window_starts(len(order))
    windows = [_ratio(served[i:i + WINDOW], large_in_order[i:i + WINDOW]) for i in starts]
    quality = _ratio(served, large_in_order)
    return {
        "quality_rel_large": quality,
        "min_window_quality_rel_large": min(windows),
        "small_share": float(kept.mean()),
        "label_share": shadows / len(order),
        "skip_share": float(skipped.mean()),
        # every skip saves a small call (one an escalation would mostly have wasted); where the
        # threshold would have accepted the small answer, it costs a frontier call
        "small_calls_saved": int(skipped.sum()),
        "frontier_calls_added": would_accept,
        "hindsight_small_share": hindsight_share(stream, quality),
        "hindsight_small_share_at_target": hindsight_share(stream, spec.target),
        "requests": len(order),
        "shadow_labels": shadows,
        "window_quality": windows,
        "window_small_share": [float(kept[i:i + WINDOW].mean()) for i in starts],
        "segments": targets.snapshot(),
        "setup": {"seed": seed, "rate_per_s": rate, "window": WINDOW, **vars(spec)},
    }


def _window_starts(rows: int) -> range:
    """Whole windows only (a short stream is one window): a trailing handful of requests
    says nothing about the quality served."""
    return range(0, max(rows - WINDOW, 0) + 1, WINDOW)


def request_order(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(rows)


def hindsight_share(stream: Stream, quality: float) -> float:
    """The most requests one fixed threshold, chosen knowing every label, keeps on the small
    model while the served quality stays at `quality` of the frontier's."""
    order = np.argsort(-stream.scores, kind="stable")
    scores = stream.scores[order]
    gain = np.cumsum(stream.small[order] - stream.large[order])  # keeping the top k
    total = stream.large.sum()
    ok = (total + gain) >= quality * total - 1e-9
    cut = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps every equal score
    best = np.flatnonzero(ok & cut)
    return float((best[-1] + 1) / len(scores)) if best.size else 0.0


def _ratio(served: np.ndarray, large: np.ndarray) -> float:
    total = float(large.sum())
    return float(served.sum()) / total if total > 0 else math.nan


def plot(report: dict, title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(report["window_quality"])) * WINDOW + WINDOW
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, report["window_quality"], label="quality / frontier, per window")
    ax.plot(x, report["window_small_share"], label="kept on the small model")
    ax.axhline(report["setup"]["target"], color="grey", linestyle=":", label="target")
    ax.axhline(report["hindsight_small_share_at_target"], color="grey", linestyle="--",
               label="hindsight fixed threshold's share at the target")
    ax.set_xlabel(f"requests (windows of {WINDOW})")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
