"""`smallfirst cache eval`: Wilson intervals, the by-template holdout, hand-built pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.pairs import training
from router.pairs.evaluate import evaluate, holdout_by_kind, kind_folds, wilson
from router.pairs.verifier import PairVerifier

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "cache_pairs.csv"
ROLE_PAIRS = FIXTURES / "role_pairs.csv"
QUICK = {"trees": 10, "repeats": 1}


def _contains_estimate(row: dict[str, Any]) -> bool:
    return row["lower_95"] <= row["rate"] <= row["upper_95"]


@pytest.mark.parametrize("successes, n, lower, upper", [
    (0, 100, 0.0, 0.0370),
    (5, 100, 0.0215, 0.1118),
    (1, 138, 0.0013, 0.0399),
    (50, 100, 0.4038, 0.5962),
    (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_matches_known_values(successes: int, n: int, lower: float,
                                              upper: float) -> None:
    got = wilson(successes, n)
    assert got == pytest.approx((lower, upper), abs=1e-4)


def test_wilson_interval_of_nothing_is_everything() -> None:
    assert wilson(0, 0) == (0.0, 1.0)


def test_kind_folds_pool_small_kinds_by_first_word() -> None:
    kinds = ["qqp_dup"] * 5 + ["qqp_nondup"] * 5 + ["negation"] * 20
    assert kind_folds(kinds, min_rows=10) == {"negation": ["negation"],
                                              "qqp": ["qqp_dup", "qqp_nondup"]}
    assert kind_folds(kinds, min_rows=0) == {k: [k] for k in ("negation", "qqp_dup",
                                                              "qqp_nondup")}


def test_kind_folds_leave_a_source_out_whole() -> None:
    kinds = ["qqp_dup"] * 50 + ["qqp_nondup"] * 50 + ["negation"] * 20
    assert kind_folds(kinds, min_rows=10, together=[["qqp_dup", "qqp_nondup"]]) == {
        "negation": ["negation"], "qqp_dup+qqp_nondup": ["qqp_dup", "qqp_nondup"]}
    with pytest.raises(ValueError, match="qqp_other"):
        kind_folds(kinds, together=[["qqp_dup", "qqp_other"]])


def test_holdout_never_trains_on_the_kind_it_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = training.read_pairs(FIXTURE)
    x = training.pair_matrix(frame, None)
    kinds_of: dict[bytes, set[str]] = {}
    for row, kind in zip(x, frame.kind, strict=True):
        kinds_of.setdefault(row.tobytes(), set()).add(kind)

    seen: list[np.ndarray] = []
    by_fold: dict[str, list[np.ndarray]] = {}
    real_fit, real_cross_fitted = training.fit, training.cross_fitted

    def fit(x: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        seen.append(x)
        return real_fit(x, *args, **kwargs)

    def cross_fitted(x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        seen.append(x)
        return real_cross_fitted(x, *args, **kwargs)

    def progress(fold: dict[str, Any]) -> None:
        by_fold[fold["left_out"]] = list(seen)
        seen.clear()

    monkeypatch.setattr(training, "fit", fit)
    monkeypatch.setattr(training, "cross_fitted", cross_fitted)
    # four folds of five or six kinds each (each kind its own fold takes 21 retrainings)
    kinds = sorted(set(frame.kind))
    groups = {f"fold{i}": kinds[i::4] for i in range(4)}
    report = holdout_by_kind(FIXTURE, None, folds=groups, cache_dir=None, progress=progress,
                             **QUICK)

    folds = {fold["left_out"]: fold for fold in report["folds"]}
    assert set(folds) == set(groups)
    assert sorted(k for fold in folds.values() for k in fold["kinds"]) == sorted(set(frame.kind))
    for name, fold in folds.items():
        left_out = set(fold["kinds"])
        assert not left_out & set(fold["fitted_kinds"])
        assert fold["rows"] == int(frame.kind.isin(left_out).sum())
        assert len(by_fold[name]) >= 2  # calibration and the final fit
        for matrix in by_fold[name]:
            trained_kinds = set().union(*(kinds_of[row.tobytes()] for row in matrix))
            assert trained_kinds, name
            # every row trained on belongs to some kept kind: none only to a left-out one
            assert all(kinds_of[row.tobytes()] - left_out for row in matrix), name

    assert set(report["by_kind"]) == set(frame.kind)
    for kind, row in report["by_kind"].items():
        assert row["rows"] == int((frame.kind == kind).sum())
        assert _contains_estimate(row), kind
        assert row["fold"] in folds and kind in folds[row["fold"]]["kinds"]
    worst = report["worst_negative_kind"]
    assert worst["kind"] in report["by_kind"]
    assert worst["rate"] <= worst["upper_95"]
    assert report["hit_rate_95"][0] <= report["hit_rate"] <= report["hit_rate_95"][1]
    assert report["false_hit_rate"] <= report["false_hit_rate_upper_95"]


def test_normal_report_carries_the_bounds() -> None:
    report = evaluate(FIXTURE, embed=None, verifier=PairVerifier.load(), include_trained=True)
    for kind, row in report["by_kind"].items():
        assert _contains_estimate(row), kind
    assert report["worst_negative_kind"]["upper_95"] >= report["worst_negative_kind"]["rate"]


def test_hand_built_pairs_without_families_are_read_and_scored(tmp_path: Path) -> None:
    frame = training.read_pairs(ROLE_PAIRS)
    assert "source" not in frame.columns
    assert frame.family.nunique() == len(frame.drop_duplicates(["q1", "q2"]))  # row by row

    from tooling.cli import main

    out = tmp_path / "role.json"
    assert main(["cache", "eval", "--pairs", str(ROLE_PAIRS), "--report", str(out),
                 "--plot", str(tmp_path / "role.png")]) == 0
    report = json.loads(out.read_text())
    assert set(report["by_kind"]) == set(frame.kind)
    assert report["by_kind"]["role_swap"]["means"] == "false_hit_rate"
    for kind, row in report["by_kind"].items():
        assert _contains_estimate(row), kind
