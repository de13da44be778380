import numpy as np
import pytest

from router.calibrate import Thresholds, choose_thresholds, write_policy

POLICY = """# The default policy: a comment that must survive.
name: auto
difficulty:
  scorer: always_small
  skip_threshold: 0.0        # never skip
confidence:
  scorer: logprob
  threshold: 0.5             # accept when sure
  min_token_logprob: -9.0    # untouched key keeps its comment
streaming:
  mode: buffer  # and so does every other section
"""


def test_write_policy_preserves_comments(tmp_path):
    path = tmp_path / "auto.yaml"
    path.write_text(POLICY)
    write_policy(path, Thresholds(0.12, 0.61, 0.95, 0.3, 0.05), "router/bundles/default", "t")
    text = path.read_text()
    assert "# The default policy: a comment that must survive." in text
    assert "# untouched key keeps its comment" in text and "# and so does every other" in text
    # comments that described the replaced values say where the new ones came from
    assert "# accept when sure" not in text and "# never skip" not in text
    assert text.count("# set by `router calibrate` (t)") == 2
    assert "scorer: learned" in text and "bundle: router/bundles/default" in text
    assert "threshold: 0.61" in text and "skip_threshold: 0.12" in text
    assert "min_token_logprob: -9.0" in text and "mode: buffer" in text


def test_thresholds_meet_target_quality():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 1000).astype(float)
    large = np.ones(1000)
    confidence = np.clip(small * 0.6 + rng.random(1000) * 0.4, 0, 1)
    difficulty = np.full(1000, 0.5)
    t = choose_thresholds(difficulty, confidence, small, large, target_quality=0.95)
    served = np.where(confidence < t.confidence_threshold, large, small)
    assert served.mean() >= 0.95 * large.mean()
    assert t.quality >= 0.95 and 0 < t.escalation_rate < 1
    budget = choose_thresholds(difficulty, confidence, small, large, max_escalation_rate=0.2)
    assert budget.escalation_rate <= 0.2 + 1e-9


def test_needs_exactly_one_goal():
    with pytest.raises(ValueError):
        choose_thresholds(np.zeros(3), None, np.zeros(3), np.ones(3))


def test_skip_threshold_where_answers_would_be_escalated_anyway():
    rng = np.random.default_rng(1)
    n = 2000
    hopeless = np.arange(n) < 400  # the small model fails these, and both scores know it
    small = np.where(hopeless, 0.0, rng.integers(0, 2, n)).astype(float)
    large = np.ones(n)
    difficulty = np.where(hopeless, 0.05, 0.6) + rng.random(n) * 0.01
    confidence = np.where(hopeless, 0.05, 0.3 + 0.6 * small) + rng.random(n) * 0.01
    t = choose_thresholds(difficulty, confidence, small, large, target_quality=0.9)
    assert (difficulty[hopeless] < t.skip_threshold).all()
    assert 0.2 <= t.skip_rate <= 0.25 and t.quality >= 0.9
