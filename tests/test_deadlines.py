"""The small model's deadlines fit the machine, and a request with nowhere to escalate is
served by the small model however unsure or slow it is (within `small_timeout`)."""

from __future__ import annotations

import pytest

from gateway.deadlines import ADAPT, FirstTokenTimes, small_deadlines
from gateway.errors import InvalidRequest, UpstreamTimeout
from gateway.types import Route
from tests.conftest import script
from tests.test_engine import call, collect, engine_for, policy, streamed_text, text_of


def test_no_escalation_target_gives_the_small_model_its_whole_timeout() -> None:
    budget = policy(latency_budget={"small_ttft": 100, "small_timeout": 9000}).latency_budget
    deadlines = small_deadlines(budget, can_escalate=False, first_tokens=FirstTokenTimes())
    assert deadlines.ttft_s == deadlines.total_s == deadlines.gap_s == 9.0


def test_adaptive_deadline_follows_the_recent_first_tokens() -> None:
    budget = policy(latency_budget={"small_ttft": 100, "small_generation": 400}).latency_budget
    times = FirstTokenTimes()
    assert small_deadlines(budget, True, times).ttft_s == 0.1  # no history: as written
    for _ in range(20):
        times.observe(200.0)
    adapted = small_deadlines(budget, True, times)
    assert adapted.ttft_s == pytest.approx(ADAPT * 0.2)
    assert adapted.total_s == pytest.approx(0.5 * ADAPT * 2)  # generation stretched alike
    fixed = policy(latency_budget={"small_ttft": 100, "small_deadline": "fixed"}).latency_budget
    assert small_deadlines(fixed, True, times).ttft_s == 0.1
    fast = FirstTokenTimes()
    for _ in range(20):
        fast.observe(10.0)
    assert small_deadlines(budget, True, fast).ttft_s == 0.1  # never tighter than the policy


async def test_without_frontier_an_unsure_answer_is_served_and_flagged(upstream: str) -> None:
    engine = engine_for(upstream, frontiers=0)
    response, decision = await engine.complete(call("hi" + script(text="eh", logprob=-3)))
    assert (decision.route, decision.note) == (Route.SMALL, "low_confidence_served")
    assert text_of(response) == "eh"


@pytest.mark.parametrize("mode", ["holdback", "buffer", "direct"])
async def test_without_frontier_every_stream_mode_serves_the_unsure_answer(
        upstream: str, mode: str) -> None:
    engine = engine_for(upstream, frontiers=0)
    pol = policy(streaming={"mode": mode, "holdback_tokens": 2})
    text = "a fairly long and rather unsure answer to stream"
    chunks, decision = await engine.stream(call("hi" + script(text=text, logprob=-3), pol))
    assert streamed_text(await collect(chunks)) == text
    assert decision.route == Route.SMALL
    assert decision.note == (None if mode == "direct" else "low_confidence_served")


async def test_without_frontier_a_slow_small_model_is_waited_for(upstream: str) -> None:
    engine = engine_for(upstream, frontiers=0)
    pol = policy(latency_budget={"small_ttft": 100, "small_generation": 100})
    response, decision = await engine.complete(call("hi" + script(text="late", ttft_ms=600),
                                                    pol))
    assert text_of(response) == "late" and decision.route == Route.SMALL
    chunks, _ = await engine.stream(call("hi" + script(text="late too", ttft_ms=600), pol))
    assert streamed_text(await collect(chunks)) == "late too"


async def test_without_frontier_a_hung_small_model_is_a_504_after_its_timeout(
        upstream: str) -> None:
    engine = engine_for(upstream, frontiers=0)
    pol = policy(latency_budget={"small_ttft": 100, "small_timeout": 300})
    with pytest.raises(UpstreamTimeout):
        await engine.complete(call("hi" + script(ttft_ms=3000), pol))


async def test_with_frontier_a_slower_machine_stops_escalating_once_measured(
        upstream: str) -> None:
    engine = engine_for(upstream)
    pol = policy(latency_budget={"small_ttft": 150})
    for _ in range(10):
        engine.first_tokens.observe(400.0)  # what this machine's first tokens take
    _, decision = await engine.complete(call("hi" + script(ttft_ms=400), pol))
    assert decision.route == Route.SMALL
    fixed = policy(latency_budget={"small_ttft": 150, "small_deadline": "fixed"})
    _, decision = await engine.complete(call("hi" + script(ttft_ms=400), fixed))
    assert (decision.route, decision.escalation) == (Route.ESCALATED, "deadline")


async def test_a_request_the_small_model_refuses_is_escalated_as_unsupported(
        upstream: str) -> None:
    refused = "hi" + script(status=400, fail_times=1, key="unsupported-1")
    response, decision = await engine_for(upstream).complete(call(refused))
    assert (decision.route, decision.escalation) == (Route.ESCALATED, "unsupported")
    assert response["choices"][0]["message"]["content"]
    with pytest.raises(InvalidRequest):  # nowhere to send it: the client hears why
        await engine_for(upstream, frontiers=0).complete(
            call("hi" + script(status=400, fail_times=1, key="unsupported-2")))


def test_a_tool_call_whose_arguments_are_not_json_is_not_served_as_good() -> None:
    from gateway.engine import _tool_calls_parse
    from gateway.types import Assembly

    def answer(arguments: str, finished: bool = True) -> Assembly:
        small = Assembly()
        small.absorb({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "get_weather",
                                                  "arguments": arguments}}]},
            "finish_reason": "tool_calls" if finished else None}]})
        return small

    assert _tool_calls_parse(answer('{"city": "Paris"}'))
    assert not _tool_calls_parse(answer('{"city": Paris'))
    assert not _tool_calls_parse(answer('["Paris"]'))
    assert _tool_calls_parse(answer('{"city": "Pa', finished=False))  # judged when complete


async def test_a_json_mode_answer_that_is_not_json_is_escalated_or_flagged(upstream: str) -> None:
    cut = "hi" + script(text='{"capital": "Par', finish_reason="stop")
    json_mode = {"response_format": {"type": "json_object"}}
    _, decision = await engine_for(upstream).complete(call(cut, **json_mode))
    assert (decision.route, decision.escalation) == (Route.ESCALATED, "invalid_json")
    response, decision = await engine_for(upstream, frontiers=0).complete(call(cut, **json_mode))
    assert (decision.route, decision.note) == (Route.SMALL, "invalid_json_served")
    whole = "hi" + script(text='{"capital": "Paris"}')
    _, decision = await engine_for(upstream).complete(call(whole, **json_mode))
    assert decision.route == Route.SMALL


def test_the_stretch_is_capped_so_a_stalled_model_is_still_caught() -> None:
    from gateway.deadlines import MAX_STRETCH

    budget = policy(latency_budget={"small_ttft": 100}).latency_budget
    stalled = FirstTokenTimes()
    for _ in range(20):
        stalled.observe(50_000.0)
    assert small_deadlines(budget, True, stalled).ttft_s == pytest.approx(0.1 * MAX_STRETCH)


async def test_missed_first_tokens_stretch_the_deadline_until_they_fit(upstream: str) -> None:
    engine = engine_for(upstream)
    pol = policy(latency_budget={"small_ttft": 100})
    routes = []
    for n in range(14):
        _, decision = await engine.complete(call(f"slow {n}" + script(ttft_ms=250), pol))
        routes.append(decision.route)
    assert routes[0] == Route.ESCALATED  # the policy's 100 ms, as written
    assert routes[-1] == Route.SMALL  # once measured, 250 ms first tokens fit
