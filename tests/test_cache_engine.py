"""The cache inside the cascade engine: faithful replay, header-free usage, Redis failures."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.backends import OpenAIWireBackend
from gateway.cache.layered import LayeredCache, build_cache
from gateway.config import BackendConfig, RetryConfig
from gateway.engine import CascadeEngine
from gateway.policy import Policy
from gateway.types import Call, Route
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
