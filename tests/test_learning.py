"""Learning from traffic: the sampled decision log, escalation labels, shadow calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from gateway.learning import TrafficLearner
from gateway.ratelimit import TokenBucket
from router.agreement import agreement, final_answer
from router.traffic import outcome_rows, read_log
from tests.conftest import script
from tests.test_engine import call, engine_for, policy


def learning_policy(**learning: Any) -> Any:
    return policy(learning=learning)


async def run(upstream: str, log: Path, text: str, pol: Any, rng: float = 0.0) -> list[dict]:
    engine = engine_for(upstream)
    engine.learner = TrafficLearner(log, engine.ask_frontier, rng=lambda: rng)
    await engine.complete(call(text, pol))
    await engine.learner.drain()
    return list(read_log([log])) if log.is_file() else []  # noqa: ASYNC240 - a test helper


def attempts(upstream: str, key: str) -> int:
    return httpx.get(f"{upstream}/stats").json()["keys"].get(key, 0)


async def test_an_escalation_is_logged_with_its_free_label(upstream: str, tmp_path: Path) -> None:
    pol = learning_policy(log_escalations=True, log_text=True)
    rows = await run(upstream, tmp_path / "log.jsonl",
                     "What is 4+4?" + script(text="The answer is 8", logprob=-3), pol, rng=0.99)
    (row,) = rows
    assert (row["route"], row["escalation"], row["label_source"]) == (
        "escalated", "low_confidence", "escalation")
    assert row["agreement"] == 1.0  # both answers state 8
    assert row["prompt"].startswith("What is 4+4?")
    assert row["small_response"] == row["large_response"] == "The answer is 8"
    assert row["features"]["p_log_chars"] > 0
    assert row["features"]["lp_q10"] is not None  # the small answer's logprobs were used
    assert row["confidence"] < 0.5


async def test_text_stays_out_of_the_log_by_default(upstream: str, tmp_path: Path) -> None:
    rows = await run(upstream, tmp_path / "log.jsonl", "secret question" + script(logprob=-3),
                     learning_policy(log_escalations=True))
    (row,) = rows
    assert "prompt" not in row and "small_response" not in row
    assert "secret" not in json.dumps(row)
    assert row["features"]  # numbers only


async def test_a_shadow_call_labels_a_kept_small_answer(upstream: str, tmp_path: Path) -> None:
    key = "shadow-1"
    pol = learning_policy(shadow_rate=1.0, log_text=True)
    rows = await run(upstream, tmp_path / "log.jsonl",
                     "hi" + script(text="Paris is the capital.", key=key), pol)
    (row,) = rows
    assert (row["route"], row["label_source"]) == ("small", "shadow")
    assert row["agreement"] == 1.0
    assert row["large_model"] == "frontier-a"
    assert attempts(upstream, key) == 2  # the small answer, then the shadow call


async def test_the_judge_gives_the_label_when_asked(upstream: str, tmp_path: Path) -> None:
    # The scripted frontier answers "yes" to everything, the judge's question included.
    pol = learning_policy(shadow_rate=1.0, judge=True)
    (row,) = await run(upstream, tmp_path / "log.jsonl", "ok?" + script(text="yes"), pol)
    assert (row["label_source"], row["agreement"]) == ("judge", 1.0)


async def test_nothing_is_logged_unless_a_policy_asks(upstream: str, tmp_path: Path) -> None:
    assert await run(upstream, tmp_path / "log.jsonl", "hi" + script(logprob=-3),
                     learning_policy()) == []


async def test_shadow_calls_keep_to_their_budget(upstream: str, tmp_path: Path) -> None:
    key = "shadow-budget"
    engine = engine_for(upstream)
    engine.learner = TrafficLearner(tmp_path / "log.jsonl", engine.ask_frontier, rng=lambda: 0)
    pol = learning_policy(shadow_rate=1.0, shadow_per_minute=1)
    for _ in range(3):
        await engine.complete(call("hi" + script(key=key), pol))
    await engine.learner.drain()
    assert attempts(upstream, key) == 3 + 1  # three small answers, one shadow call
    assert len(list(read_log([tmp_path / "log.jsonl"]))) == 1  # noqa: ASYNC240


def test_token_bucket_refills_over_time() -> None:
    clock = [0.0]
    bucket = TokenBucket(per_minute=2, clock=lambda: clock[0])
    assert bucket.take() and bucket.take() and not bucket.take()
    clock[0] = 30.0
    assert bucket.take() and not bucket.take()


def test_agreement_compares_final_answers_then_words() -> None:
    assert final_answer("so 3+5=8.\n#### 1,200") == "1200"
    assert final_answer("The answer is (C).") == "C"
    assert agreement("The answer is 8", "Hence #### 8.0") == 1.0
    assert agreement("The answer is 8", "The answer is 9") == 0.0
    assert agreement("Paris is the capital", "The capital is Paris") == 1.0
    assert agreement("I am not sure", "It is Berlin") == 0.0


def test_log_rows_become_outcome_rows(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    records = [
        {"request_id": "a", "policy": "auto", "prompt": "q1", "small_response": "s",
         "large_response": "l", "agreement": 0.0, "small_model": "m", "large_model": "L"},
        {"request_id": "b", "policy": "auto", "agreement": 1.0},  # no text: unusable
        {"request_id": "c", "policy": "auto", "prompt": "q2", "small_response": "s",
         "large_response": None, "agreement": None},  # no label: unusable
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (row,) = outcome_rows(read_log([log]))
    assert row["id"] == "a" and row["dataset"] == "traffic" and row["task"] == "auto"
    assert (row["small_score"], row["large_score"]) == (0.0, 1.0)
