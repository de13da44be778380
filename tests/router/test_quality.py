"""The quality-target calibrator and its offline replay."""

import itertools
import json
import random

import numpy as np
import pandas as pd
import pytest

from router.cli import main
from router.quality import ESCALATE_ALL, QualityCalibrator, QualityTarget, search_threshold
from router.replay import Stream, hindsight_share, replay


def synthetic(n: int, seed: int, good_above: float = 0.5, flip: float = 0.05) -> Stream:
    """Scores in [0, 1]; the small answer is right above `good_above` (with label noise)."""
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    small = (scores >= good_above).astype(float)
    noise = rng.random(n) < flip
    small[noise] = 1 - small[noise]
    return Stream(scores, small, np.ones(n), ["all"] * n)


def ticking(per_second: float = 10.0):
    """A clock that moves on by one request at `per_second` each time it is read."""
    ticks = itertools.count()
    return lambda: next(ticks) / per_second


def test_cold_start_escalates_everything_until_enough_labels():
    calibrator = QualityCalibrator(QualityTarget(min_labels=50, refresh_every=1),
                                   rng=random.Random(0).random)
    for i in range(49):
        entry, _ = calibrator.record(0.99, escalated=True)
        calibrator.label(entry, 1.0, 1.0)
        assert calibrator.threshold == ESCALATE_ALL, i
    entry, _ = calibrator.record(0.99, escalated=True)
    calibrator.label(entry, 1.0, 1.0)
    assert calibrator.threshold <= 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_holds_the_target_in_every_window(seed):
    stream = synthetic(6000, seed, flip=0.02)
    report = replay(stream, QualityTarget(target=0.95), seed=seed)
    assert report["quality_rel_large"] >= 0.95
    assert report["min_window_quality_rel_large"] >= 0.93
    assert report["label_share"] <= 0.10
    # the threshold found its way down from escalating everything
    assert report["small_share"] >= 0.7 * report["hindsight_small_share"]


def test_a_lower_target_keeps_more_on_the_small_model():
    stream = synthetic(4000, 3)
    strict = replay(stream, QualityTarget(target=0.98), seed=0)
    loose = replay(stream, QualityTarget(target=0.85), seed=0)
    assert loose["small_share"] > strict["small_share"]
    assert strict["quality_rel_large"] > loose["quality_rel_large"] >= 0.85


def test_drift_raises_the_threshold_and_quality_recovers():
    before = synthetic(4000, 4, good_above=0.3, flip=0.0)
    after = synthetic(6000, 5, good_above=0.8, flip=0.0)
    calibrator = QualityCalibrator(QualityTarget(target=0.95, window=1500),
                                   rng=random.Random(0).random, clock=ticking())
    thresholds, served = [], []
    for part in (before, after):
        for score, small, large in zip(part.scores, part.small, part.large, strict=True):
            kept = score >= calibrator.threshold
            entry, shadow = calibrator.record(score, escalated=not kept)
            if not kept or shadow:
                calibrator.label(entry, small, large, shadow=kept)
            served.append(small if kept else large)
            thresholds.append(calibrator.threshold)
    assert thresholds[3999] < 0.5 and thresholds[-1] > 0.7
    assert calibrator.drifts > 0
    assert np.mean(served[-1000:]) >= 0.95


def test_lost_labels_count_as_the_worst_case():
    def threshold(lose: bool) -> float:
        calibrator = QualityCalibrator(QualityTarget(min_labels=100, refresh_every=1),
                                       rng=random.Random(1).random, clock=ticking())
        rng = np.random.default_rng(0)
        for score in rng.random(3000):
            kept = score >= calibrator.threshold
            entry, shadow = calibrator.record(score, escalated=not kept)
            if not kept:
                calibrator.label(entry, 1.0, 1.0)
            elif shadow:
                calibrator.lose(entry) if lose else calibrator.label(entry, 1.0, 1.0, True)
        return calibrator.threshold

    assert threshold(lose=True) > threshold(lose=False)


def test_shadow_share_stays_within_the_per_minute_budget():
    now = {"t": 0.0}
    calibrator = QualityCalibrator(QualityTarget(shadow_rate=0.5, shadow_per_minute=30),
                                   rng=random.Random(2).random, clock=lambda: now["t"])
    shadows = 0
    for i in range(6000):  # 100 accepted requests a second for a minute
        now["t"] = i / 100
        _, shadow = calibrator.record(0.9, escalated=False)
        shadows += shadow
    assert 15 <= shadows <= 60  # about 30 in expectation, never the 3,000 the rate asks


def test_threshold_search_stops_at_the_first_failure():
    from router.quality import Scored

    spec = QualityTarget(target=0.9, min_labels=10)
    # strictest first: scores 0.9..0.5 right, 0.45 wrong, then right again below it
    window = [Scored(c, 1.0, 1.0, 1.0) for c in np.linspace(0.9, 0.5, 300)]
    window += [Scored(0.45, 1.0, 0.0, 1.0) for _ in range(100)]
    window += [Scored(c, 1.0, 1.0, 1.0) for c in np.linspace(0.4, 0.1, 600)]
    estimate = search_threshold(window, [], spec)
    assert estimate.threshold == pytest.approx(0.5)
    assert estimate.small_share == pytest.approx(0.3)
    assert estimate.quality == pytest.approx(1.0) and estimate.quality_bound <= 1.0


def test_hindsight_share_is_the_most_a_fixed_threshold_keeps():
    stream = Stream(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1.0, 1.0, 0.0, 1.0]),
                    np.ones(4), ["all"] * 4)
    assert hindsight_share(stream, 1.0) == 0.5
    assert hindsight_share(stream, 0.75) == 1.0


def test_replay_command_writes_the_report_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLFIRST_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame({
        "prompt": [f"What is {a} plus {b}?" for a, b in rng.integers(0, 99, (n, 2))],
        "small_response": [f"The answer is {i % 7}." for i in range(n)],
        "small_score": (rng.random(n) < 0.7).astype(float),
        "large_score": np.ones(n),
    })
    data = tmp_path / "outcomes.parquet"
    frame.to_parquet(data)
    policy = tmp_path / "p.yaml"
    policy.write_text("name: qt\nquality: {target: 0.9, min_labels: 20}\n"
                      "learning: {shadow_rate: 0.1}\n")
    report = tmp_path / "out" / "replay.json"
    assert main(["replay", "--data", str(data), "--policy", str(policy),
                 "--report", str(report), "--seed", "1"]) == 0
    found = json.loads(report.read_text())
    assert found["quality_rel_large"] >= found["min_window_quality_rel_large"] > 0
    for key in ("small_share", "label_share", "hindsight_small_share"):
        assert 0 <= found[key] <= 1
    assert found["requests"] == n and found["setup"]["seed"] == 1
    assert report.with_suffix(".png").stat().st_size > 0


def test_replay_names_a_policy_without_a_target(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("name: plain\n")
    data = tmp_path / "none.parquet"
    pd.DataFrame({"prompt": ["x"], "small_score": [1.0], "large_score": [1.0]}).to_parquet(data)
    assert main(["replay", "--data", str(data), "--policy", str(policy),
                 "--report", str(tmp_path / "r.json")]) == 2
    assert "sets no quality.target" in capsys.readouterr().err


def difficulty_stream(n: int, seed: int, related: bool) -> Stream:
    """A difficulty score per request; where `related`, easy-looking requests (low scores) get
    low confidence too, so the threshold rejects nearly all of them."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    scores = np.clip(difficulty + rng.normal(0, 0.1, n), 0, 1) if related else rng.random(n)
    small = (scores >= 0.5).astype(float)
    flip = rng.random(n) < 0.02
    small[flip] = 1 - small[flip]
    return Stream(scores, small, np.ones(n), ["all"] * n, difficulty)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_skip_threshold_rises_where_small_answers_are_rejected(seed):
    stream = difficulty_stream(6000, seed, related=True)
    spec = QualityTarget(target=0.95)
    report = replay(stream, spec, seed=seed)
    without = replay(stream, QualityTarget(target=0.95, skip_if_accepted_below=0), seed=seed)
    (segment,) = report["segments"]
    assert without["skip_share"] == 0 and report["skip_share"] >= 0.25  # fewer small calls
    assert report["small_calls_saved"] == segment["skips"] == round(report["skip_share"] * 6000)
    assert 0.2 < segment["skip_threshold"] < 0.5 and segment["skip_explored"] > 0
    # skipping costs almost no accepted answers, and never quality
    assert report["frontier_calls_added"] <= 0.1 * report["small_calls_saved"]
    assert report["small_share"] >= 0.9 * without["small_share"]
    assert report["quality_rel_large"] >= 0.95 and report["min_window_quality_rel_large"] >= 0.93


def test_no_skipping_where_easy_looking_requests_are_accepted():
    report = replay(difficulty_stream(4000, 2, related=False), QualityTarget(target=0.95))
    (segment,) = report["segments"]
    assert report["skip_share"] == 0 and segment["skip_threshold"] is None
    assert report["small_share"] > 0.3  # the acceptance threshold was set, nothing skipped


def test_no_skipping_before_the_acceptance_threshold_is_set():
    calibrator = QualityCalibrator(QualityTarget(min_labels=10_000), rng=random.Random(0).random)
    for i in range(500):  # every low-difficulty request rejected, but too few labels
        entry, _ = calibrator.record(i / 1000, escalated=True, difficulty=i / 1000)
        calibrator.label(entry, 0.0, 1.0)
    assert calibrator.threshold == ESCALATE_ALL
    assert calibrator.plan(0.0) == (True, 1.0) and calibrator.skips == 0


def test_a_skipped_request_counts_as_served_by_the_frontier_never_as_accepted():
    from router.quality import SKIPPED, Scored

    spec = QualityTarget(target=0.9, min_labels=10)
    tried = [Scored(i / 100, 1.0, 1.0, 1.0, i) for i in range(50)]  # all right, all labelled
    skipped = [Scored(SKIPPED, 1.0, 0.0, 1.0, 50 + i, skipped=True) for i in range(50)]
    estimate = search_threshold(tried + skipped, [], spec)
    assert estimate.threshold == 0.0  # every tried request may be accepted...
    assert estimate.small_share == 0.5  # ...and no skipped one is
