"""`router retrain`: a bundle trained on the decision log, promoted only if it holds up on
the most recent labels."""

import json
import shutil

import pytest

from router.cli import main
from router.retrain import MIN_ROWS, split_by_time


def decision_rows(rows: int, wrong_from: int | None = None) -> list[dict]:
    """Labelled rows as the gateway logs them: easy sums the small model gets right (until
    row `wrong_from`, after which it gets everything wrong), and proofs it gets wrong
    (agreement with the frontier's answer is the label)."""
    out = []
    for i in range(rows):
        easy = i % 2 == 0
        prompt = (f"What is {i} plus {i + 1}?" if easy
                  else f"Prove that the series number {i} converges, with every step.")
        right = easy and (wrong_from is None or i < wrong_from)
        out.append({
            "ts": 1000.0 + i, "request_id": f"r{i}", "policy": "qt",
            "prompt": prompt, "small_response": f"The answer is {2 * i + 1}",
            "large_response": f"The answer is {2 * i + 1 if right else 2 * i + 7}",
            "agreement": 1.0 if right else 0.0,
        })
    return out


def decision_log(path, rows: int, wrong_from: int | None = None) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in decision_rows(rows, wrong_from)))


@pytest.fixture
def served(tmp_path, trained_bundle):
    """A policies folder whose quality policy reads a bundle trained on other data."""
    policies = tmp_path / "policies"
    shutil.copytree(trained_bundle, policies / "bundles" / "served")
    (policies / "qt.yaml").write_text(
        "name: qt\nconfidence: {scorer: learned, bundle: bundles/served}\n"
        "quality: {target: 0.95, min_labels: 20, refresh_every: 5}\n"
        "learning: {shadow_rate: 0.2, shadow_per_minute: 600}\n")
    return policies


def manifest(policies) -> str:
    return (policies / "bundles" / "served" / "MANIFEST.sha256").read_text()


def test_a_better_bundle_is_promoted(served, fake_embedder, small_recipe, tmp_path, capsys):
    log = tmp_path / "decisions.jsonl"
    decision_log(log, 400)
    before = manifest(served)
    code = main(["retrain", "--from-log", str(log), "--policy", "qt", "--policies",
                 str(served)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["promote"], summary
    assert summary["candidate"]["quality_rel_large"] >= 0.95
    assert summary["candidate"]["small_share"] > summary["current"]["small_share"]
    assert (summary["trained_rows"], summary["held_out_rows"]) == (280, 120)
    assert manifest(served) != before  # swapped in place; the gateway reloads it


def test_the_log_may_be_the_replicas_redis_stream(served, fake_embedder, small_recipe,
                                                  redis_url, capsys):
    import uuid

    import redis

    key = f"decisions-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    for row in decision_rows(400):
        client.xadd(key, {"row": json.dumps(row)})
    client.close()
    code = main(["retrain", "--from-log", f"{redis_url}?stream={key}", "--policy", "qt",
                 "--policies", str(served)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["promote"], summary
    assert (summary["trained_rows"], summary["held_out_rows"]) == (280, 120)


def test_a_bundle_that_gains_nothing_on_recent_traffic_is_not_promoted(
        served, fake_embedder, small_recipe, tmp_path, capsys):
    log = tmp_path / "decisions.jsonl"
    decision_log(log, 400, wrong_from=280)  # the newest traffic: the small model is all wrong
    before = manifest(served)
    code = main(["retrain", "--from-log", str(log), "--policy", "qt", "--policies",
                 str(served)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and not summary["promote"], summary
    assert summary["candidate"]["quality_rel_large"] >= 0.95  # the calibrator held the line
    assert manifest(served) == before


def test_too_few_labels_is_one_clear_line(served, tmp_path, capsys):
    log = tmp_path / "decisions.jsonl"
    decision_log(log, MIN_ROWS - 1)
    assert main(["retrain", "--from-log", str(log), "--policy", "qt", "--policies",
                 str(served)]) == 2
    assert f"needs at least {MIN_ROWS}" in capsys.readouterr().err


def test_the_split_is_by_time_with_the_latest_held_out():
    rows = [{"id": i} for i in range(100)]
    train, held = split_by_time(rows, 0.25)
    assert [r["id"] for r in held] == list(range(75, 100)) and len(train) == 75
