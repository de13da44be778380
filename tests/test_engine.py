"""The cascade engine against the scripted upstream's latencies and faults (no HTTP layer)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from gateway.backends import BackendFailure, LiteLLMBackend, OpenAIWireBackend
from gateway.config import BackendConfig, RetryConfig
from gateway.engine import CascadeEngine
from gateway.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout
from gateway.policy import Policy
from gateway.types import Call, Route
from tests.conftest import script

FAST_RETRY = RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02)


def engine_for(
    upstream: str, frontiers: int = 1, retry: RetryConfig = FAST_RETRY, small_litellm=False
) -> CascadeEngine:
    config = BackendConfig(model="hosted_vllm/small", api_base=f"{upstream}/v1")
    small = (LiteLLMBackend(config, drop_unsupported=False) if small_litellm
             else OpenAIWireBackend(config))
    names = ["frontier-a", "frontier-b", "frontier-c"][:frontiers]
    return CascadeEngine(
        small,
        [LiteLLMBackend(BackendConfig(model=f"openai/{n}", api_base=f"{upstream}/v1",
                                      api_key="k"), drop_unsupported=True) for n in names],
        retry,
    )


def policy(**fields: Any) -> Policy:
    return Policy.model_validate({"name": "p", **fields})


def call(text: str, pol: Policy | None = None, **params: Any) -> Call:
    include_usage = params.pop("include_usage", False)
    return Call(
        request_id="t1",
        policy=pol or policy(),
        params={"messages": [{"role": "user", "content": text}], **params},
        include_usage=include_usage,
    )


def text_of(response: dict[str, Any]) -> str:
    return response["choices"][0]["message"]["content"]


async def collect(chunks) -> list[dict[str, Any]]:
    return [chunk async for chunk in chunks]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )


def attempts(upstream: str, key: str) -> int:
    return httpx.get(f"{upstream}/stats").json()["keys"].get(key, 0)


@pytest.mark.parametrize("small_litellm", [False, True], ids=["direct", "litellm"])
async def test_confident_small_answer_is_accepted(upstream: str, small_litellm: bool) -> None:
    # litellm's first call on a busy machine may take past the default first-token deadline
    pol = policy(latency_budget={"small_ttft": 20_000})
    response, decision = await engine_for(upstream, small_litellm=small_litellm).complete(
        call("hi" + script(text="Paris is the capital.", logprob=-0.05), pol)
    )
    assert decision.route == Route.SMALL
    assert text_of(response) == "Paris is the capital."
    assert response["model"] == "small"
    assert decision.confidence == pytest.approx(0.951, abs=0.001)


async def test_unsure_small_answer_escalates_and_usage_adds_up(upstream: str) -> None:
    response, decision = await engine_for(upstream).complete(
        call("hi" + script(text="maybe five", logprob=-2.0))
    )
    assert decision.route == Route.ESCALATED
    assert decision.escalation == "low_confidence"
    assert response["model"] == "frontier-a"
    usage = response["usage"]
    assert usage["completion_tokens"] == 2 * 2  # both attempts answered "maybe five"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_one_bad_token_fails_the_min_logprob_floor(upstream: str) -> None:
    pol = policy(confidence={"threshold": 0.5, "min_token_logprob": -5})
    _, decision = await engine_for(upstream).complete(
        call("hi" + script(output_tokens=40, logprob=-0.01, min_logprob=-7), pol)
    )
    assert decision.confidence > 0.5
    assert decision.route == Route.ESCALATED


@pytest.mark.parametrize("small_litellm", [False, True], ids=["direct", "litellm"])
async def test_small_error_escalates(upstream: str, small_litellm: bool) -> None:
    response, decision = await engine_for(upstream, small_litellm=small_litellm).complete(
        call("hi" + script(status=500, fail_times=1, key=f"small-err-{small_litellm}"))
    )
    assert decision.route == Route.ESCALATED
    assert decision.escalation == "error"
    assert response["model"] == "frontier-a"


async def test_small_ttft_deadline_escalates(upstream: str) -> None:
    pol = policy(latency_budget={"small_ttft": 100})
    response, decision = await engine_for(upstream).complete(
        call("hi" + script(ttft_ms=600, key="slow-small", fail_times=0), pol)
    )
    assert decision.escalation == "deadline"
    assert decision.route == Route.ESCALATED


async def test_small_generation_deadline_escalates(upstream: str) -> None:
    pol = policy(streaming={"mode": "buffer"},
                 latency_budget={"small_ttft": 500, "small_generation": 150})
    _, decision = await engine_for(upstream).complete(
        call("hi" + script(output_tokens=40, tokens_per_s=50), pol)
    )
    assert decision.escalation == "deadline"


async def test_frontier_retries_honour_retry_after(upstream: str) -> None:
    import time

    started = time.monotonic()
    response, decision = await engine_for(upstream).complete(
        call("hi" + script(logprob=-3, status=429, retry_after=1, fail_times=3, key="ra"))
    )
    # The small call failed too (same script), so the frontier's two 429s were waited out.
    assert decision.route == Route.ESCALATED
    assert time.monotonic() - started >= 1.9
    assert attempts(upstream, "ra") == 4  # small once, then the frontier three times


async def test_rate_limit_beyond_retries_is_a_429_with_retry_after(upstream: str) -> None:
    with pytest.raises(RateLimited) as caught:
        await engine_for(upstream).complete(
            call("hi" + script(status=429, retry_after=30, key="ra-long"),
                 policy(route="frontier_only"))
        )
    assert caught.value.headers()["Retry-After"] == "30"


async def test_fallback_frontier_answers_when_first_fails(upstream: str) -> None:
    # fail_times counts per key across attempts: 3 small+frontier-a failures, then success.
    engine = engine_for(upstream, frontiers=2, retry=RetryConfig(max_attempts=2,
                                                                 backoff_base_s=0.01))
    response, decision = await engine.complete(
        call("hi" + script(status=503, fail_times=3, key="fallback"))
    )
    assert response["model"] == "frontier-b"
    assert attempts(upstream, "fallback") == 4


async def test_all_frontiers_failing_is_a_502(upstream: str) -> None:
    with pytest.raises(UpstreamError):
        await engine_for(upstream, frontiers=2).complete(
            call("hi" + script(status=500, key="down"), policy(route="frontier_only"))
        )


async def test_frontier_deadline_is_a_504(upstream: str) -> None:
    pol = policy(route="frontier_only", latency_budget={"escalation": 200})
    with pytest.raises(UpstreamTimeout):
        await engine_for(upstream).complete(call("hi" + script(ttft_ms=1500), pol))


async def test_difficulty_below_skip_threshold_goes_to_frontier(upstream: str) -> None:
    pol = policy(difficulty={"skip_threshold": 1.0})  # always_small scores 1.0: not below
    _, decision = await engine_for(upstream).complete(call("hi", pol))
    assert decision.route == Route.SMALL

    class Hard:
        async def score(self, prompt) -> float:
            return 0.1

    engine = engine_for(upstream)
    engine.difficulty["always_small"] = Hard()
    pol = policy(difficulty={"skip_threshold": 0.5})
    response, decision = await engine.complete(call("hi" + script(key="skip"), pol))
    assert (decision.route, decision.escalation) == (Route.FRONTIER, "difficulty")
    assert attempts(upstream, "skip") == 1  # the small model was never called


class RecordingConfidence:
    def __init__(self) -> None:
        self.answers: list[Any] = []

    async def score(self, prompt, answer) -> float:
        self.answers.append(answer)
        return 0.9


async def test_samples_reach_the_confidence_scorer_and_are_billed(upstream: str) -> None:
    engine = engine_for(upstream)
    engine.confidence["logprob"] = recorder = RecordingConfidence()
    pol = policy(confidence={"samples": 3})
    text = "hi" + script(text="The answer is 4.")
    response, decision = await engine.complete(call(text, pol))
    assert decision.route == Route.SMALL
    assert recorder.answers[-1].samples == ["The answer is 4."] * 3
    # the main answer (4 pieces) and three samples of it are all billed
    assert response["usage"]["completion_tokens"] == 4 * 4

    await engine.complete(call(text, policy()))
    assert recorder.answers[-1].samples is None


async def test_late_or_failing_samples_are_skipped_not_fatal(upstream: str) -> None:
    engine = engine_for(upstream)
    the_call = call("hi", policy(confidence={"samples": 2},
                                 latency_budget={"small_ttft": 100, "small_generation": 100}))

    async def never() -> dict:
        await asyncio.sleep(3600)
        return {}

    async def failing() -> dict:
        raise BackendFailure("small", "boom")

    late = asyncio.create_task(never())
    started = time.monotonic()
    assert await engine._samples(the_call, late) is None
    assert time.monotonic() - started < 1.0
    await asyncio.sleep(0)
    assert late.cancelled()
    assert await engine._samples(the_call, asyncio.create_task(failing())) is None


# ---- streaming modes ---------------------------------------------------------------------


async def test_buffer_stream_replays_the_accepted_small_answer(upstream: str) -> None:
    pol = policy(streaming={"mode": "buffer"})
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(text="one two three"), pol, include_usage=True)
    )
    out = await collect(chunks)
    assert decision.route == Route.SMALL
    assert streamed_text(out) == "one two three"
    assert out[-1]["choices"] == [] and out[-1]["usage"]["completion_tokens"] == 3
    assert all("logprobs" not in c for chunk in out for c in chunk["choices"])


async def test_holdback_accepts_prefix_then_streams_the_rest(upstream: str) -> None:
    pol = policy(streaming={"mode": "holdback", "holdback_tokens": 3})
    words = " ".join(f"w{i}" for i in range(12))
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(text=words, key="hold-ok"), pol, include_usage=True)
    )
    assert decision.route == Route.SMALL and decision.confidence is not None
    out = await collect(chunks)
    assert streamed_text(out) == words
    assert out[-1]["usage"]["completion_tokens"] == 12


async def test_holdback_rejects_unsure_prefix_before_sending_anything(upstream: str) -> None:
    pol = policy(streaming={"mode": "holdback", "holdback_tokens": 3})
    words = " ".join(f"w{i}" for i in range(30))
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(text=words, logprob=-2, tokens_per_s=200), pol)
    )
    assert decision.route == Route.ESCALATED
    out = await collect(chunks)
    assert {c["model"] for c in out} == {"frontier-a"}
    assert streamed_text(out) == words


async def test_direct_mode_streams_without_judging(upstream: str) -> None:
    pol = policy(streaming={"mode": "direct"})
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(text="a b c", logprob=-5), pol)
    )
    assert decision.route == Route.SMALL and decision.confidence is None
    assert streamed_text(await collect(chunks)) == "a b c"


async def test_cut_after_first_bytes_ends_with_an_error_not_a_success(upstream: str) -> None:
    pol = policy(streaming={"mode": "direct"})
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(output_tokens=20, cut_after_tokens=5), pol)
    )
    received = []
    with pytest.raises(GatewayError) as caught:
        async for chunk in chunks:
            received.append(chunk)
    assert received, "some content was already sent"
    assert "incomplete" in caught.value.message


async def test_stall_after_commit_past_the_small_timeout_is_a_timeout_error(
        upstream: str) -> None:
    pol = policy(streaming={"mode": "direct"},
                 latency_budget={"small_ttft": 300, "small_timeout": 1000})
    chunks, _ = await engine_for(upstream).stream(
        call("hi" + script(output_tokens=10, stall_after_tokens=3, stall_ms=2000), pol)
    )
    with pytest.raises(UpstreamTimeout):
        await collect(chunks)


@pytest.mark.parametrize("mode", ["direct", "holdback"])
async def test_a_pause_after_commit_longer_than_the_first_token_deadline_is_waited_out(
        upstream: str, mode: str) -> None:
    """Once the client has the start of an answer nothing can take over, and a busy machine
    pauses streams (vLLM on CPU, while it prefills another prompt): the first-token deadline
    used to cut the answer, which the client saw as "the answer is incomplete"."""
    pol = policy(streaming={"mode": mode, "holdback_tokens": 2},
                 latency_budget={"small_ttft": 300})
    words = " ".join(f"w{n}" for n in range(10))
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(text=words, stall_after_tokens=4, stall_ms=1200), pol)
    )
    assert decision.route == Route.SMALL
    assert streamed_text(await collect(chunks)) == words


async def test_streamed_frontier_retries_before_the_first_byte(upstream: str) -> None:
    pol = policy(route="frontier_only")
    chunks, decision = await engine_for(upstream).stream(
        call("hi" + script(text="ok then", status=502, fail_times=2, key="sretry"), pol)
    )
    assert decision.route == Route.FRONTIER
    assert streamed_text(await collect(chunks)) == "ok then"
    assert attempts(upstream, "sretry") == 3


async def test_logprobs_reach_the_client_only_when_asked(upstream: str) -> None:
    response, _ = await engine_for(upstream).complete(
        call("hi" + script(text="x y"), logprobs=True)
    )
    entries = response["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["x", " y"]
