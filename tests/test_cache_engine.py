"""The cache inside the cascade engine: faithful replay, header-free usage, Redis failures."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.backends import OpenAIWireBackend
from gateway.cache.layered import LayeredCache, build_cache
from gateway.config import BackendConfig, RetryConfig
from gateway.embedding import SharedEmbedding
from gateway.engine import CascadeEngine
from gateway.policy import Policy
from gateway.types import CachedAnswer, Call, Route
from tests.conftest import RedisServer, script

POLICY = Policy.model_validate({
    "name": "cached", "route": "small_only", "confidence": {"scorer": "accept_all"},
    "streaming": {"mode": "buffer"},
})
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def engine(upstream: str, cache: LayeredCache) -> CascadeEngine:
    small = OpenAIWireBackend(BackendConfig(model="hosted_vllm/small", api_base=f"{upstream}/v1"))
    return CascadeEngine(small, [], RetryConfig(max_attempts=1), cache=cache)


def call(text: str, stream: bool = False, **params: Any) -> Call:
    return Call(request_id=uuid.uuid4().hex[:8], policy=POLICY, tenant="acme",
                params={"messages": [{"role": "user", "content": text}], **params},
                include_usage=stream)


async def settle(eng: CascadeEngine) -> None:
    await asyncio.gather(*eng._writes)


async def streamed(eng: CascadeEngine, c: Call) -> tuple[list[dict[str, Any]], Route]:
    chunks, decision = await eng.stream(c)
    out = [chunk async for chunk in chunks]
    await settle(eng)
    return out, decision.route


def contents(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c["choices"] and c["choices"][0]["delta"].get("content")]


def tool_calls(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call_ = calls.setdefault(delta["index"], {"id": None, "name": "", "args": ""})
                call_["id"] = delta.get("id") or call_["id"]
                call_["name"] += delta.get("function", {}).get("name") or ""
                call_["args"] += delta.get("function", {}).get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def finish(chunks: list[dict[str, Any]]) -> str | None:
    return next(c["choices"][0]["finish_reason"] for c in reversed(chunks) if c["choices"])


@pytest.fixture
async def memory_cache() -> LayeredCache:
    cache = build_cache(None, lambda name: POLICY.cache)
    await cache.start()
    return cache


async def test_streamed_replay_is_chunk_faithful(upstream: str, memory_cache) -> None:
    eng = engine(upstream, memory_cache)
    text = "The capital of France is Paris, a city of about two million people."
    first, route = await streamed(eng, call("capital?" + script(text=text), stream=True))
    again, cached_route = await streamed(eng, call("capital?" + script(text=text), stream=True))
    assert (route, cached_route) == (Route.SMALL, Route.CACHE_EXACT)
    assert len(contents(first)) > 3
    assert contents(again) == contents(first)
    assert "".join(contents(again)).encode() == text.encode()
    assert finish(again) == finish(first) == "stop"
    assert again[-1]["usage"]["total_tokens"] == 0  # a hit bills no model tokens


async def test_streamed_tool_call_replays(upstream: str, memory_cache) -> None:
    eng = engine(upstream, memory_cache)
    message = "weather in Oslo?" + script(tool_call={"arguments": {"city": "Oslo"}})
    first, _ = await streamed(eng, call(message, stream=True, tools=TOOLS))
    again, route = await streamed(eng, call(message, stream=True, tools=TOOLS))
    assert route == Route.CACHE_EXACT
    assert tool_calls(again) == tool_calls(first)
    assert tool_calls(first)[0]["name"] == "get_weather"
    assert finish(again) == finish(first) == "tool_calls"


async def test_json_hit_after_stream_and_zero_usage(upstream: str, memory_cache) -> None:
    eng = engine(upstream, memory_cache)
    text = "Forty-two is the answer."
    await streamed(eng, call("q" + script(text=text), stream=True))
    response, decision = await eng.complete(call("q" + script(text=text)))
    assert decision.route == Route.CACHE_EXACT
    assert response["choices"][0]["message"]["content"] == text
    assert response["usage"]["total_tokens"] == 0


async def test_truncated_answers_are_not_stored(upstream: str, memory_cache) -> None:
    eng = engine(upstream, memory_cache)
    c = call("long" + script(output_tokens=40), max_tokens=5)
    await eng.complete(c)
    await settle(eng)
    _, decision = await eng.complete(call("long" + script(output_tokens=40), max_tokens=5))
    assert decision.route == Route.SMALL  # finish_reason "length": never stored


async def test_no_cache_and_no_store(upstream: str, memory_cache) -> None:
    eng = engine(upstream, memory_cache)
    quiet = call("nostore" + script(text="a"))
    quiet.write_cache = False
    await eng.complete(quiet)
    await settle(eng)
    _, decision = await eng.complete(call("nostore" + script(text="a")))
    assert decision.route == Route.SMALL
    await settle(eng)
    fresh = call("nostore" + script(text="a"))
    fresh.read_cache = False
    _, decision = await eng.complete(fresh)
    assert decision.route == Route.SMALL
    _, decision = await eng.complete(call("nostore" + script(text="a")))
    assert decision.route == Route.CACHE_EXACT


async def test_redis_killed_mid_test_then_back(upstream: str, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    cache = build_cache(server.url, lambda name: POLICY.cache, prefix="killed",
                        semantic=False)
    cache.retry_after_s = 0.2
    await cache.start()
    eng = engine(upstream, cache)
    ask = "What is 2 + 2?" + script(text="4.")
    try:
        await eng.complete(call(ask))
        await settle(eng)
        assert (await eng.complete(call(ask)))[1].route == Route.CACHE_EXACT
        server.kill()
        for _ in range(3):  # requests still succeed, as misses
            response, decision = await eng.complete(call(ask))
            await settle(eng)
            assert decision.route == Route.SMALL
            assert response["choices"][0]["message"]["content"] == "4."
        server.start()  # back, empty
        await asyncio.sleep(0.3)
        await eng.complete(call(ask))
        await settle(eng)
        assert (await eng.complete(call(ask)))[1].route == Route.CACHE_EXACT
    finally:
        await cache.close()
        server.kill()


# ---- the semantic lookup runs alongside the small model's request ---------------------------

STORED = CachedAnswer(model="small", pieces=["Use strrev."], finish_reason="stop",
                      usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})


class GatedEmbed:
    """The real embedder, held back until the test opens the gate (a slow embedding)."""

    def __init__(self, embed: SharedEmbedding) -> None:
        self.embed, self.gate = embed, threading.Event()

    def __call__(self, texts: list[str]):
        if not self.gate.wait(60):
            raise TimeoutError("the gate was never opened")
        return self.embed(texts)


def cascade(upstream: str, cache: LayeredCache) -> CascadeEngine:
    small = OpenAIWireBackend(BackendConfig(model="hosted_vllm/small", api_base=f"{upstream}/v1"))
    frontier = OpenAIWireBackend(BackendConfig(model="openai/frontier", api_base=f"{upstream}/v1",
                                               name="frontier"))
    return CascadeEngine(small, [frontier], RetryConfig(max_attempts=1), cache=cache)


def semantic_policy(name: str, deadline_ms: float) -> Policy:
    return Policy.model_validate({
        "name": name, "route": "cascade", "streaming": {"mode": "buffer"},
        "confidence": {"scorer": "logprob", "threshold": 0.5},
        # no audits: one would ask the small model again, 5% of hits by default
        "cache": {"semantic": True, "lookup_deadline_ms": deadline_ms,
                  "semantic_audit_rate": 0}})


SEMANTIC = semantic_policy("semantic", 30_000)
HASTY = semantic_policy("hasty", 150)  # a lookup deadline the gated embedder overruns
BY_NAME = {policy.name: policy for policy in (SEMANTIC, HASTY)}


async def semantic_engine(upstream: str, redis_url: str, embed) -> CascadeEngine:
    cache = build_cache(redis_url, lambda name: BY_NAME[name].cache,
                        prefix=uuid.uuid4().hex[:8], embed=embed)
    await cache.start()
    return cascade(upstream, cache)


def asked(question: str, key: str, policy: Policy = SEMANTIC, **fields: Any) -> Call:
    return Call(request_id=uuid.uuid4().hex[:8], policy=policy, tenant="acme",
                params={"messages": [{"role": "user", "content": question + script(key=key,
                                                                               **fields)}]})


def stats(upstream: str) -> dict[str, Any]:
    return httpx.get(f"{upstream}/stats").json()


async def remember(eng: CascadeEngine, question: str, key: str, policy: Policy = SEMANTIC,
                   **fields: Any) -> None:
    await eng.cache.store(asked(question, key, policy, **fields).cache_request(), STORED)


@pytest.mark.parametrize("streamed_", [False, True], ids=["json", "stream"])
async def test_a_semantic_hit_cancels_the_slow_small_request(
        upstream: str, redis_url: str, embed: SharedEmbedding, streamed_: bool) -> None:
    eng = await semantic_engine(upstream, redis_url, embed)
    key = f"slow-{uuid.uuid4().hex[:6]}"
    await remember(eng, "How do I reverse a string in PHP?", key, ttft_ms=60_000)
    c = asked("how do I reverse a string in PHP", key, ttft_ms=60_000)
    if streamed_:
        chunks, decision = await asyncio.wait_for(eng.stream(c), 30)
        text = "".join(contents([chunk async for chunk in chunks]))
    else:
        response, decision = await asyncio.wait_for(eng.complete(c), 30)
        text = response["choices"][0]["message"]["content"]
    assert (decision.route, decision.cache, text) == (Route.CACHE_SEMANTIC, "semantic",
                                                      "Use strrev.")
    await upstream_saw(upstream, "cancelled", key)  # the small model's caller hung up
    assert stats(upstream)["keys"][key] == 1 and stats(upstream)["cancelled"][key] == 1
    await eng.cache.close()


async def test_the_small_model_is_asked_while_the_lookup_goes_on(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    gated = GatedEmbed(embed)
    eng = await semantic_engine(upstream, redis_url, gated)
    key = f"fast-{uuid.uuid4().hex[:6]}"
    task = asyncio.ensure_future(eng.complete(asked(
        "What is the tallest mountain in Africa?", key, text="Kilimanjaro.", logprob=-0.01)))
    assert await small_model_asked(upstream, key)  # with the embedding still held back
    assert not task.done()  # the lookup decides first
    gated.gate.set()
    response, decision = await asyncio.wait_for(task, 30)
    assert (decision.route, decision.cache) == (Route.SMALL, "miss")
    assert response["choices"][0]["message"]["content"] == "Kilimanjaro."
    await eng.cache.close()


async def small_model_asked(upstream: str, key: str) -> bool:
    return await upstream_saw(upstream, "keys", key)


async def upstream_saw(upstream: str, counter: str, key: str) -> bool:
    """Whether the upstream's `counter` (its /stats) counts `key` within 10 s."""
    for _ in range(200):
        if stats(upstream)[counter].get(key):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_frontier_waits_for_the_lookup_and_a_hit_saves_it(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    gated = GatedEmbed(embed)
    eng = await semantic_engine(upstream, redis_url, gated)
    key = f"unsure-{uuid.uuid4().hex[:6]}"
    fields = {"text": "maybe strrev", "logprob": -3.0}  # rejected: the frontier would answer
    gated.gate.set()
    await remember(eng, "How do I reverse a string in PHP?", key, **fields)
    gated.gate.clear()
    task = asyncio.ensure_future(eng.complete(asked("how do I reverse a string in PHP", key,
                                                    **fields)))
    assert await small_model_asked(upstream, key)  # it answers, and is rejected
    await asyncio.sleep(0.5)
    assert not task.done()  # waiting for the lookup, not asking the frontier
    gated.gate.set()
    response, decision = await asyncio.wait_for(task, 30)
    assert decision.route == Route.CACHE_SEMANTIC
    assert response["choices"][0]["message"]["content"] == "Use strrev."
    assert stats(upstream)["keys"][key] == 1  # the small model only: no frontier call
    await eng.cache.close()


async def test_a_lookup_may_outrun_its_deadline_while_the_answer_is_not_ready(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    gated = GatedEmbed(embed)
    eng = await semantic_engine(upstream, redis_url, gated)
    key = f"slow-{uuid.uuid4().hex[:6]}"
    gated.gate.set()
    await remember(eng, "How do I reverse a string in PHP?", key, HASTY, ttft_ms=60_000)
    gated.gate.clear()
    task = asyncio.ensure_future(eng.complete(asked("how do I reverse a string in PHP", key,
                                                    HASTY, ttft_ms=60_000)))
    await asyncio.sleep(0.6)  # four times the deadline, the small model still thinking
    gated.gate.set()
    response, decision = await asyncio.wait_for(task, 30)
    assert decision.route == Route.CACHE_SEMANTIC
    assert response["choices"][0]["message"]["content"] == "Use strrev."
    assert eng.cache.counts["deadline"] == 0
    await eng.cache.close()


async def test_a_lookup_past_its_deadline_is_given_up_once_the_answer_is_ready(
        upstream: str, redis_url: str, embed: SharedEmbedding) -> None:
    gated = GatedEmbed(embed)
    eng = await semantic_engine(upstream, redis_url, gated)
    try:
        key = f"fast-{uuid.uuid4().hex[:6]}"
        c = asked("What is the tallest mountain in Africa?", key, HASTY, text="Kilimanjaro.",
                  logprob=-0.01)
        response, decision = await asyncio.wait_for(eng.complete(c), 30)  # gate still shut
        assert (decision.route, decision.cache) == (Route.SMALL, "miss")
        assert response["choices"][0]["message"]["content"] == "Kilimanjaro."
        assert eng.cache.counts["deadline"] == 1
    finally:
        gated.gate.set()
        await eng.cache.close()
