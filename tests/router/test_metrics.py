import numpy as np
import pytest

from router import metrics


def curve(scores, small, large):
    return metrics.quality_curve(np.array(scores), np.array(small), np.array(large))


def test_perfect_router_on_hand_made_case():
    # four prompts: small right on 2; large right on all; escalate lowest score first
    c = curve([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], [1, 1, 1, 1])
    assert c.q_small == 0.5 and c.q_large == 1.0
    np.testing.assert_allclose(c.quality, [0.5, 0.75, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(c.pgr, [0, 0.5, 1, 1, 1])
    # trapezoid over x = 0, .25, .5, .75, 1
    assert metrics.apgr(c) == pytest.approx(0.25 * (0.25 + 0.75 + 1 + 1))
    assert metrics.cpt(c, 0.5) == 0.25
    assert metrics.cpt(c, 0.8) == 0.5
    assert metrics.small_share_at_quality(c, 0.95) == 0.5


def test_constant_router_is_random():
    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    c = curve(np.zeros(200), small, large)
    assert metrics.apgr(c) == pytest.approx(0.5)
    np.testing.assert_allclose(c.pgr, np.linspace(0, 1, 201))


def test_worst_router_and_oracle():
    small, large = [1, 0, 1, 0], [1, 1, 1, 1]
    assert metrics.apgr(curve(metrics.oracle_scores(small, large), small, large)) > 0.7
    assert metrics.apgr(curve([0, 1, 0, 1], small, large)) < 0.3


def test_cpt_never_reached_and_share():
    c = curve([0.5, 0.5], [1, 1], [0, 0])  # large is worse everywhere
    assert metrics.small_share_at_quality(c, 0.95) == 1.0


def test_cost_at_quality_relative_to_all_large():
    c = curve([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], [1, 1, 1, 1])
    # half escalated: 0.5 large calls + every prompt's small call at 1/20
    assert metrics.cost_at_quality(c, 0.95, 20.0, 0.0) == pytest.approx(0.55)
    assert metrics.cost_at_quality(c, 0.95, 20.0, 1.0) == pytest.approx(0.525)
    assert metrics.cost_at_quality(c, 0.95, 20.0, 0.25) == pytest.approx(0.5375)


def test_roc_auc_and_ece():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert metrics.expected_calibration_error([0, 0, 1, 1], [0.75] * 4) == pytest.approx(0.25)
