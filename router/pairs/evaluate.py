"""`smallfirst cache eval`: the shipped verifier and policy threshold on labelled pairs.

Reports the hit rate on positives (paraphrases served) and the false-hit rate on negatives
(different questions served a cached answer), overall and by kind, and plots the trade-off
against cosine similarity alone. Rows the shipped model was fitted on are left out (the
figures are on families it never saw) unless asked otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from router.pairs.training import pair_matrix, read_pairs, row_id
from router.pairs.vectors import Embed
from router.pairs.verifier import FEATURES, PairVerifier

TARGET_FALSE_HITS = 0.01
TARGET_HITS = 0.5


def evaluate(
    pairs: Path,
    embed: Embed,
    verifier: PairVerifier,
    *,
    max_false_hit_rate: float = TARGET_FALSE_HITS,
    threshold: float | None = None,
    min_cosine: float = 0.6,
    include_trained: bool = False,
    plot: Path | None = None,
) -> dict[str, Any]:
    frame = read_pairs(pairs)
    trained = set(verifier.data.get("trained_rows", ()))
    unseen = np.array([row_id(a, b) not in trained for a, b in zip(frame.q1, frame.q2,
                                                                   strict=True)])
    if not include_trained:
        frame = frame[unseen].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{pairs}: no rows left that the verifier was not trained on")
    x = pair_matrix(frame, embed)
    cosine = x[:, FEATURES.index("cosine")]
    prob = np.array([verifier.probability_of(row) for row in x])
    chosen = verifier.threshold_for(max_false_hit_rate) if threshold is None else threshold
    served = (prob >= chosen) & (cosine >= min_cosine)
    y = frame.same_answer.to_numpy().astype(int)
    kinds = frame.kind.to_numpy()
    report = {
        "pairs": str(pairs), "rows": len(frame), "rows_left_out_as_trained": int((~unseen).sum())
        if not include_trained else 0,
        "threshold": chosen, "min_cosine": min_cosine,
        "max_false_hit_rate": max_false_hit_rate,
        **_rates(served, y, kinds),
        "cosine_only": _cosine_only(cosine, y, kinds, max_false_hit_rate),
    }
    report["targets_met"] = bool(
        report["false_hit_rate"] <= TARGET_FALSE_HITS
        and report["worst_negative_kind"]["rate"] <= TARGET_FALSE_HITS
        and report["hit_rate"] >= TARGET_HITS)
    if plot is not None:
        _plot(plot, prob, cosine, y, kinds, served, min_cosine)
        report["plot"] = str(plot)
    return report


def _rates(served: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
    by_kind = {}
    for kind in sorted(set(kinds)):
        rows = kinds == kind
        positive = bool(y[rows].max())
        by_kind[kind] = {"positive": positive, "rows": int(rows.sum()),
                         "rate": round(float(served[rows].mean()), 4),
                         "means": "hit_rate" if positive else "false_hit_rate"}
    negatives = {k: v for k, v in by_kind.items() if not v["positive"]}
    worst = max(negatives, key=lambda k: negatives[k]["rate"]) if negatives else None
    return {
        "hit_rate": round(float(served[y == 1].mean()), 4) if (y == 1).any() else None,
        "false_hit_rate": round(float(served[y == 0].mean()), 4) if (y == 0).any() else None,
        "worst_negative_kind": {"kind": worst,
                                "rate": negatives[worst]["rate"] if worst else 0.0},
        "by_kind": by_kind,
    }


def _sweep(score: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Rows of [threshold, hit rate, false-hit rate, worst-kind false-hit rate]."""
    negative_kinds = sorted(set(kinds[y == 0]))
    rows = []
    for threshold in np.unique(np.round(score, 4)):
        served = score >= threshold
        worst = max((served[(y == 0) & (kinds == k)].mean() for k in negative_kinds),
                    default=0.0)
        rows.append([threshold, served[y == 1].mean() if (y == 1).any() else 0.0,
                     served[y == 0].mean() if (y == 0).any() else 0.0, worst])
    return np.array(rows)


def _cosine_only(cosine: np.ndarray, y: np.ndarray, kinds: np.ndarray,
                 target: float) -> dict[str, Any]:
    """The best cosine threshold alone at the same target (worst kind and overall)."""
    sweep = _sweep(cosine, y, kinds)
    meets = sweep[sweep[:, 3] <= target]
    overall = sweep[sweep[:, 2] <= target]
    return {
        "hit_rate_at_target_worst_kind": round(float(meets[:, 1].max()), 4) if len(meets)
        else 0.0,
        "hit_rate_at_target_overall": round(float(overall[:, 1].max()), 4) if len(overall)
        else 0.0,
    }


def _plot(path: Path, prob: np.ndarray, cosine: np.ndarray, y: np.ndarray, kinds: np.ndarray,
          served: np.ndarray, min_cosine: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gated = np.where(cosine >= min_cosine, prob, -1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for score, label, style in ((gated, "verifier", "-"), (cosine, "cosine only", "--")):
        sweep = _sweep(score, y, kinds)
        ax.plot(sweep[:, 2], sweep[:, 1], style, label=f"{label}: overall false hits")
        ax.plot(sweep[:, 3], sweep[:, 1], style, alpha=0.6,
                label=f"{label}: worst negative kind")
    ax.scatter([served[y == 0].mean()], [served[y == 1].mean()], color="black", zorder=5,
               label="shipped threshold")
    ax.axvline(TARGET_FALSE_HITS, color="grey", linewidth=0.8)
    ax.axhline(TARGET_HITS, color="grey", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false-hit rate on different questions")
    ax.set_ylabel("hit rate on paraphrases")
    ax.set_title("Semantic cache: paraphrases served vs wrong answers served")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
