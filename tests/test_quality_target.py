"""A policy's quality target: the live gateway and `router replay` run one calibrator."""

from __future__ import annotations

import itertools
import json
import random
import time
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import RetryConfig
from gateway.engine import CascadeEngine
from gateway.learning import TrafficLearner
from gateway.policy import Policy
from gateway.types import Assembly, Call, Decision, Prompt, Route
from router import QualityTargets
from router.replay import Stream, replay, request_order
from tests.conftest import SHIPPED_POLICIES, script, upstream_config

SEED = 7
QUALITY = {"target": 0.9, "min_labels": 30, "window": 800, "refresh_every": 5}
LEARNING = {"shadow_rate": 0.2, "shadow_per_minute": 120}


def stream(n: int = 1500) -> Stream:
    rng = np.random.default_rng(SEED)
    scores = rng.random(n).round(4)
    small = ((scores > 0.4) ^ (rng.random(n) < 0.05)).astype(float)
    difficulty = np.clip(scores + rng.normal(0, 0.1, n), 0, 1).round(4)
    return Stream(scores, small, np.ones(n), ["all"] * n, difficulty)


def answer(text: str) -> Assembly:
    small = Assembly()
    small.text = [text]
    return small


class Frontier:
    """Stands in for the frontier: its answer agrees with the small one where the row says so."""

    name = "frontier"

    def __init__(self, small_right: dict[str, float]) -> None:
        self.small_right = small_right

    def text(self, request_id: str) -> str:
        return "The answer is 1" if self.small_right[request_id] else "The answer is 2"

    async def ask(self, params: dict[str, Any]) -> tuple[str, str]:
        return "frontier", self.text(params["messages"][0]["content"])


class Difficulty:
    """The difficulty scorer: each request's score from the stream (the prompt is its row)."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores

    async def score(self, prompt: Any) -> float:
        return float(self.scores[int(prompt.text)])


async def test_live_learner_and_replay_reach_the_same_thresholds_and_skips() -> None:
    data = stream()
    policy = Policy.model_validate({"name": "qt", "quality": QUALITY, "learning": LEARNING})
    ticks = itertools.count()
    engine = CascadeEngine(small=None, frontiers=[Frontier({})], retry=RetryConfig())
    engine.quality = QualityTargets(rng=random.Random(SEED).random,
                                    clock=lambda: next(ticks) / 10.0)
    order = request_order(len(data.scores), SEED)
    frontier = Frontier({str(row): data.small[row] for row in order})
    engine.learner = TrafficLearner(None, frontier.ask, quality=engine.quality)
    engine.difficulty = {"always_small": Difficulty(data.difficulty)}
    kept = skipped = 0
    for row in order:
        request_id = str(row)
        call = Call(request_id, policy, {"messages": [{"role": "user", "content": request_id}]})
        call.decision = Decision("qt")
        if await engine._plan(call, call.decision) == "frontier":  # the learned skip
            engine.learner.observe(call)  # no small answer: nothing to learn from
            skipped += 1
            continue
        difficulty = call.decision.difficulty
        threshold = engine._acceptance_threshold(call)  # what the engine accepts at
        escalated = data.scores[row] < threshold
        call.decision = Decision("qt", Route.ESCALATED if escalated else Route.SMALL,
                                 difficulty, confidence=float(data.scores[row]),
                                 escalation="low_confidence" if escalated else None)
        call.small_answer = answer("The answer is 1")
        call.frontier_text = frontier.text(request_id) if escalated else None
        engine.learner.observe(call)
        await engine.learner.drain()  # labels land before the next request, as in replay
        kept += not escalated

    spec = policy.quality_target
    offline = replay(data, spec, seed=SEED, rate=10.0)
    (live,) = engine.quality.snapshot()
    (replayed,) = offline["segments"]
    assert live["labels"] > QUALITY["min_labels"] and live["threshold"] is not None
    assert live["skip_threshold"] is not None and live["skips"] > 0 and live["skip_explored"] > 0
    for key in ("threshold", "labels", "shadow_labels", "requests", "threshold_rises",
                "skip_threshold", "skips", "skip_explored"):
        assert live[key] == replayed[key], key
    assert kept / len(order) == pytest.approx(offline["small_share"])
    assert skipped / len(order) == pytest.approx(offline["skip_share"])


def test_a_quality_target_needs_shadow_labels() -> None:
    with pytest.raises(ValueError, match="needs learning.shadow_rate"):
        Policy.model_validate({"name": "qt", "quality": {"target": 0.95}})


QT_POLICY = """\
name: qt
route: cascade
confidence: {scorer: logprob, threshold: 0.99}
quality: {target: 0.8, min_labels: 10, refresh_every: 2}
learning: {shadow_rate: 0.5, shadow_per_minute: 600}
streaming: {mode: buffer}
cache: {enabled: false}
"""


def qt_gateway(gateways: Any, upstream: str, tmp_path: Any, policy: str) -> str:
    """A gateway whose only policy is `qt`, given as YAML."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "qt.yaml").write_text(policy)
    return gateways.start(upstream_config(upstream, default_policy="qt"), policies=policies)


def test_the_gateway_escalates_until_labels_show_the_target_holds(
    gateways: Any, upstream: str, tmp_path: Any
) -> None:
    base = qt_gateway(gateways, upstream, tmp_path, QT_POLICY)
    routes = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(60):
            response = client.post("/v1/chat/completions", json={
                "model": "qt", "messages": [{"role": "user", "content": f"q{i}" + script(
                    text="The answer is 4", logprob=-0.2)}]})
            assert response.status_code == 200, response.text
            routes.append(response.headers["x-smallfirst-route"])
        quality = client.get("/admin/quality").json()["segments"]
        metrics = client.get("/metrics").text
    # Cold start: every answer goes to the frontier until ten labels are in; the stand-in
    # frontier agrees with the small model, so the threshold then drops and answers stay small.
    assert set(routes[:10]) == {"escalated"}
    assert "small" in routes[20:]
    (segment,) = quality
    assert segment["policy"] == "qt" and segment["labels"] >= 10
    assert segment["threshold"] is not None and segment["threshold"] < 0.99
    threshold_series = [line for line in metrics.splitlines()
                        if line.startswith("smallfirst_quality{") and 'figure="threshold"' in line]
    assert len(threshold_series) == 1 and 'policy="qt"' in threshold_series[0]
    # every small answer is accepted: nothing is worth skipping, and the gauge says so
    assert segment["skip_threshold"] is None and segment["skips"] == 0
    assert any(line.startswith("smallfirst_quality{") and 'figure="skips"' in line
               for line in metrics.splitlines())


HOLDBACK_QT_POLICY = QT_POLICY.replace("{mode: buffer}", "{mode: holdback, holdback_tokens: 4}")
LONG_ANSWER = " ".join(f"word{i}" for i in range(40))  # ten times the held prefix


def test_a_rejected_held_prefix_is_labelled_by_the_whole_small_answer(
    gateways: Any, upstream: str, tmp_path: Any
) -> None:
    """In holdback, an escalated answer was cut at its prefix; compared as a prefix, a small
    answer that matches the frontier's word for word would look 10% as good and the target
    would never let it serve. The small model finishes it in the background for the label."""
    base = qt_gateway(gateways, upstream, tmp_path, HOLDBACK_QT_POLICY)
    routes = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(40):
            body = {"model": "qt", "stream": True, "messages": [{"role": "user", "content": (
                f"q{i}" + script(text=LONG_ANSWER, logprob=-0.2))}]}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                text = "".join(
                    (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get(
                        "content") or ""
                    for line in response.iter_lines()
                    if line.startswith("data: {"))
                routes.append(response.headers["x-smallfirst-route"])
            assert text.split() == LONG_ANSWER.split()  # the client sees one whole answer
            if routes[-1] == "escalated":
                time.sleep(0.05)  # the label lands once the small answer has finished
        (segment,) = client.get("/admin/quality").json()["segments"]
    assert set(routes[:10]) == {"escalated"}  # the cold start
    assert routes[-10:] == ["small"] * 10, routes
    assert segment["labels"] >= 10 and segment["threshold"] < 0.99


def test_the_shipped_auto_and_chat_hold_a_quality_target(
    gateways: Any, upstream: str
) -> None:
    """Out of the box, a gateway with a frontier keeps no small answer until labels show the
    95% target holds: a cold start escalates, and every escalation is labelled whole."""
    base = gateways.start(upstream_config(upstream), policies=SHIPPED_POLICIES)
    with httpx.Client(base_url=base, timeout=30) as client:
        for i, policy in enumerate(("auto", "chat", "auto")):
            body = {"model": policy, "stream": True, "messages": [{"role": "user", "content": (
                f"Name primary colour {i}." + script(text=LONG_ANSWER, logprob=-0.01))}]}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.read()
                assert response.headers["x-smallfirst-route"] == "escalated"
                assert response.headers["x-smallfirst-escalation"] == "low_confidence"
        segments = {}
        for _ in range(100):  # the labels land once the small answers have finished
            segments = {s["policy"]: s for s in client.get("/admin/quality").json()["segments"]}
            if segments.get("auto", {}).get("labels") == 2 and segments.get(
                    "chat", {}).get("labels") == 1:
                break
            time.sleep(0.1)
    assert segments["auto"]["labels"] == 2 and segments["chat"]["labels"] == 1
    assert segments["auto"]["threshold"] is None  # escalate all: too few labels yet


@pytest.mark.parametrize(("judge", "label"), [(False, "agreement"), (True, 1.0)])
async def test_with_a_judge_an_escalation_is_labelled_by_its_verdict(judge: bool,
                                                                     label: Any) -> None:
    """Two good free-text answers share few words: token overlap would call the small one
    wrong, and a quality target would escalate such traffic for ever. The judge says yes."""
    from router import answer_agreement

    small_text, frontier_text = "Blue.", "Azure, on a cloudless day."
    asked: list[str] = []

    async def ask(params: dict[str, Any]) -> tuple[str, str]:
        asked.append(params["messages"][0]["content"])
        return "frontier", "yes"

    policy = Policy.model_validate({"name": "qt", "quality": QUALITY,
                                    "learning": {**LEARNING, "judge": judge}})
    learner = TrafficLearner(None, ask)
    messages = [{"role": "user", "content": "Sky colour?"}]
    call = Call("r1", policy, {"messages": messages}, prompt=Prompt(messages))
    call.decision = Decision("qt", Route.ESCALATED, confidence=0.1,
                             escalation="low_confidence")
    call.small_answer, call.frontier_text = answer(small_text), frontier_text
    learner.observe(call)
    await learner.drain()
    (scored,) = learner.quality.calibrator("qt", "all", policy.quality_target)._window
    expected = answer_agreement(small_text, frontier_text) if label == "agreement" else label
    assert expected < 0.5 or judge
    assert scored.small == expected and len(asked) == judge
