"""`smallfirst cache eval`: the shipped verifier and policy threshold on labelled pairs.

Reports the hit rate on positives (paraphrases served) and the false-hit rate on negatives
(different questions served a cached answer), overall and by kind, and plots the trade-off
against cosine similarity alone. Rows the shipped model was fitted on are left out (the
figures are on families it never saw) unless asked otherwise.

`holdout_by_kind` (`smallfirst cache eval --by-template-holdout`) asks the harder question:
how the verifier does on a kind of pair it was never given. Each kind (or group of small
kinds) is left out in turn; the verifier is retrained on the other kinds with the training
recipe, calibrated the same way, and scored on the kind it never saw. Every rate comes with
its 95% Wilson score interval: a false-hit figure is only as good as its upper bound.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from router.pairs import training
from router.pairs.training import pair_matrix, read_pairs, row_id
from router.pairs.vectors import Embed
from router.pairs.verifier import PairVerifier

TARGET_FALSE_HITS = 0.01
TARGET_HITS = 0.5
Z_95 = 1.959964


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    lower = 0.0 if successes <= 0 else max(0.0, centre - half)
    upper = 1.0 if successes >= n else min(1.0, centre + half)
    return lower, upper


def _rate(served: np.ndarray) -> dict[str, Any]:
    """Rate, count and 95% interval of the served share of some rows."""
    k, n = int(served.sum()), int(served.size)
    lower, upper = wilson(k, n)
    return {"rate": round(k / n, 4) if n else None, "served": k, "rows": n,
            "lower_95": round(lower, 4), "upper_95": round(upper, 4)}


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
    cosine = training.pair_cosines(frame, embed)
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
    """Hit rate on positives, false-hit rate on negatives, overall and by kind, each with its
    95% Wilson interval (`upper_95` is the bound that matters for false hits)."""
    by_kind = {}
    for kind in sorted(set(kinds)):
        rows = kinds == kind
        positive = bool(y[rows].max())
        by_kind[kind] = {"positive": positive,
                         "means": "hit_rate" if positive else "false_hit_rate",
                         **_rate(served[rows])}
    negatives = {k: v for k, v in by_kind.items() if not v["positive"]}
    worst = max(negatives, key=lambda k: (negatives[k]["rate"], negatives[k]["upper_95"])) \
        if negatives else None
    hits, false_hits = _rate(served[y == 1]), _rate(served[y == 0])
    return {
        "hit_rate": hits["rate"],
        "hit_rate_95": [hits["lower_95"], hits["upper_95"]] if hits["rows"] else None,
        "false_hit_rate": false_hits["rate"],
        "false_hit_rate_upper_95": false_hits["upper_95"] if false_hits["rows"] else None,
        "worst_negative_kind": {"kind": worst,
                                "rate": negatives[worst]["rate"] if worst else 0.0,
                                "upper_95": negatives[worst]["upper_95"] if worst else None},
        "by_kind": by_kind,
    }


def kind_folds(kinds: Any, min_rows: int = 100,
               together: list[list[str]] | tuple = ()) -> dict[str, list[str]]:
    """What to leave out together: each kind alone, except kinds with fewer than `min_rows`
    rows, which go with the kinds sharing their name up to the first underscore (`qqp_dup`
    and `qqp_nondup` as `qqp`), and the groups in `together` (a source left out whole: its
    positives and its negatives)."""
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    unknown = sorted({k for group in together for k in group} - set(counts))
    if unknown:
        raise ValueError(f"no pairs of kind {', '.join(unknown)} to leave out")
    joined = {kind: "+".join(group) for group in together for kind in group}
    folds: dict[str, list[str]] = {}
    for kind in sorted(counts):
        name = joined.get(kind) or (kind if counts[kind] >= min_rows else kind.split("_")[0])
        folds.setdefault(name, []).append(kind)
    return folds


def holdout_by_kind(
    pairs: Path,
    embed: Embed | None,
    *,
    max_false_hit_rate: float = TARGET_FALSE_HITS,
    min_cosine: float = 0.6,
    folds: dict[str, list[str]] | None = None,
    min_rows: int = 100,
    together: list[list[str]] | tuple = (),
    trees: int | None = None,
    repeats: int = training.CALIBRATION_REPEATS,
    seed: int = 0,
    cache_dir: Path | None = training.EMBEDDING_CACHE,
    progress: Any = None,
) -> dict[str, Any]:
    """Leave each kind of pair out of training in turn and score it with a verifier that
    never saw it.

    Per fold, as `training.train` does on the kinds it keeps: a quarter of their groups set
    aside (`held_out`), the trees fitted on the rest, the threshold read off the cross-fitted
    calibration table at `max_false_hit_rate` (worst kind), then the left-out kind scored
    (and, for comparison, the set-aside groups of the kept kinds). Where the kept kinds
    cannot be split with every kind on both sides (small files), the trees are fitted on all
    of them. `trees` and `repeats` trade fidelity to the recipe for time.
    """
    from threadpoolctl import threadpool_limits

    frame = read_pairs(pairs)
    x = pair_matrix(frame, embed, cache_dir)
    y = frame.same_answer.to_numpy().astype(int)
    kinds = frame.kind.to_numpy()
    names = np.array(training.groups(frame))
    cosine = training.pair_cosines(frame, embed, cache_dir)
    folds = folds or kind_folds(kinds, min_rows, together)
    prob = np.full(len(frame), np.nan)
    threshold = np.full(len(frame), np.nan)
    fold_reports = []
    started = time.monotonic()
    # one native thread: on a few thousand rows the trees' threads mostly wait on each other
    with threadpool_limits(limits=1):
        for name, left_out in folds.items():
            test = np.isin(kinds, left_out)
            kept = np.flatnonzero(~test)
            try:
                aside = kept[training.held_out(frame.iloc[kept].reset_index(drop=True), seed)]
            except ValueError:
                aside = kept[:0]
            fitted = np.setdiff1d(kept, aside)
            oof = training.cross_fitted(x[fitted], y[fitted], list(names[fitted]), seed,
                                        repeats, trees)
            table = training.calibration(oof.ravel(), np.tile(y[fitted], len(oof)),
                                         np.tile(kinds[fitted], len(oof)))
            model = training.fit(x[fitted], y[fitted], seed, trees)
            verifier = PairVerifier({**training.export(model), "calibration": table})
            chosen = verifier.threshold_for(max_false_hit_rate)
            prob[test] = training.predict(model, x[test])
            threshold[test] = chosen
            fold = {"left_out": name, "kinds": list(left_out), "rows": int(test.sum()),
                    "fitted_rows": int(len(fitted)), "fitted_kinds": sorted(set(kinds[fitted])),
                    "threshold": chosen, "calibrated": _at(table, chosen)}
            if len(aside):
                served = (training.predict(model, x[aside]) >= chosen) & \
                    (cosine[aside] >= min_cosine)
                seen = _rates(served, y[aside], kinds[aside])
                fold["set_aside_groups"] = {k: seen[k] for k in (
                    "hit_rate", "false_hit_rate", "worst_negative_kind")}
            fold["elapsed_s"] = round(time.monotonic() - started, 1)
            fold_reports.append(fold)
            if progress is not None:
                progress(fold)
    scored = ~np.isnan(prob)  # every row, unless `folds` leaves out only some kinds
    served = (prob[scored] >= threshold[scored]) & (cosine[scored] >= min_cosine)
    report = {
        "pairs": str(pairs), "rows": int(scored.sum()), "by_template_holdout": True,
        "max_false_hit_rate": max_false_hit_rate, "min_cosine": min_cosine,
        "trees": trees or training.GBM["max_iter"], "calibration_repeats": repeats,
        "seed": seed, **_rates(served, y[scored], kinds[scored]),
    }
    fold_of = {kind: fold["left_out"] for fold in fold_reports for kind in fold["kinds"]}
    for kind, row in report["by_kind"].items():
        row["fold"] = fold_of[kind]
        row["threshold"] = float(threshold[kinds == kind][0])
    report["folds"] = fold_reports
    report["seconds"] = round(time.monotonic() - started, 1)
    report["targets_met"] = bool(
        report["false_hit_rate"] is not None and report["false_hit_rate"] <= TARGET_FALSE_HITS
        and report["worst_negative_kind"]["rate"] <= TARGET_FALSE_HITS
        and report["hit_rate"] is not None and report["hit_rate"] >= TARGET_HITS)
    return report


def _at(table: list[list[float]], threshold: float) -> dict[str, float]:
    """The calibration table's cross-fitted figures (kept kinds) at a threshold."""
    for row_threshold, worst, overall, hits in sorted(table):
        if row_threshold >= threshold:
            return {"worst_kind_false_hit_rate": worst, "false_hit_rate": overall,
                    "hit_rate": hits}
    return {"worst_kind_false_hit_rate": 0.0, "false_hit_rate": 0.0, "hit_rate": 0.0}


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
