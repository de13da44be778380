"""Rate limits and allowances shared by replicas through Redis (a real Valkey), and their
in-process fallback: each limiter or allowance object below plays one replica."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from gateway.api.auth import Tenant
from gateway.cache.redis_exact import connect
from gateway.errors import RateLimited
from gateway.limits import Limits, RateLimitConfig, RateLimiter
from gateway.ratelimit import Allowances
from tests.conftest import GatewayRunner, free_port, script, upstream_config, write


def tenant_limits(**limits: int) -> RateLimitConfig:
    return RateLimitConfig(tenant=Limits(**limits), stream_lease_s=60)


def replicas(redis_url: str, config: RateLimitConfig, n: int = 3) -> list[RateLimiter]:
    prefix = f"limits-{uuid.uuid4().hex[:8]}"
    return [RateLimiter(config, connect(redis_url), prefix) for _ in range(n)]


async def admitted(limiter: RateLimiter, tenant: Tenant, *, stream: bool = False) -> bool:
    try:
        await limiter.admit(tenant, stream=stream)
        return True
    except RateLimited as refused:
        assert refused.status_code == 429 and refused.headers()["Retry-After"].isdigit()
        return False


async def close(limiters: list[RateLimiter]) -> None:
    await asyncio.gather(*(limiter.close() for limiter in limiters))


async def test_requests_per_minute_hold_across_replicas(redis_url: str) -> None:
    limiters = replicas(redis_url, tenant_limits(requests_per_minute=7))
    acme = Tenant("acme")
    results = await asyncio.gather(*(admitted(limiters[n % 3], acme) for n in range(20)))
    assert sum(results) == 7
    assert await admitted(limiters[0], Tenant("other"))  # another tenant has its own count
    with pytest.raises(RateLimited) as refused:
        await limiters[1].admit(acme, stream=False)
    assert "7 requests per minute" in refused.value.message
    assert 50 <= refused.value.retry_after <= 60  # until the oldest request leaves the window
    await close(limiters)


async def test_key_limits_count_each_key_and_the_tenant_limit_all_keys(redis_url: str) -> None:
    config = RateLimitConfig(tenant=Limits(requests_per_minute=5),
                             key=Limits(requests_per_minute=2))
    one, two = replicas(redis_url, config, 2)
    key_a = Tenant("acme", key_id="aaaa")
    key_b = Tenant("acme", key_id="bbbb", key_limits=Limits(requests_per_minute=10))
    assert [await admitted(one, key_a) for _ in range(3)] == [True, True, False]
    # key b's own limit is 10, but the tenant's 5 (2 spent by key a) binds first
    assert [await admitted(two, key_b) for _ in range(4)] == [True, True, True, False]
    await close([one, two])


async def test_tokens_count_from_a_request_end(redis_url: str) -> None:
    one, two = replicas(redis_url, tenant_limits(tokens_per_minute=100), 2)
    acme = Tenant("acme")
    first = await one.admit(acme, stream=False)
    assert await admitted(two, acme)  # nothing spent yet
    one.release(first, 120)
    await one.close()
    assert not await admitted(two, acme)
    await two.close()


async def test_concurrent_streams_are_leases_a_killed_replica_cannot_keep(
        redis_url: str) -> None:
    config = RateLimitConfig(tenant=Limits(concurrent_streams=2), stream_lease_s=0.5)
    killed, alive = replicas(redis_url, config, 2)
    acme = Tenant("acme")
    held = await alive.admit(acme, stream=True)
    assert await admitted(killed, acme, stream=True)  # never released: the replica "dies"
    assert not await admitted(alive, acme, stream=True)
    assert await admitted(alive, acme, stream=False)  # the stream limit binds streams only
    renewing = asyncio.ensure_future(alive.renew_forever())
    await asyncio.sleep(0.8)  # the dead replica's lease ran out; the live one was renewed
    assert await admitted(alive, acme, stream=True)
    assert not await admitted(alive, acme, stream=True)
    alive.release(held, 0)
    await asyncio.sleep(0.05)
    assert await admitted(alive, acme, stream=True)
    renewing.cancel()
    await close([killed, alive])


async def test_without_redis_each_process_counts_alone() -> None:
    limiter = RateLimiter(tenant_limits(requests_per_minute=2, concurrent_streams=1))
    acme = Tenant("acme")
    assert [await admitted(limiter, acme) for _ in range(3)] == [True, True, False]
    streams = RateLimiter(tenant_limits(concurrent_streams=1))
    held = await streams.admit(acme, stream=True)
    assert not await admitted(streams, acme, stream=True)
    streams.release(held, 0)
    assert await admitted(streams, acme, stream=True)


async def test_redis_down_degrades_to_per_process_limits(caplog: pytest.LogCaptureFixture) -> None:
    absent = f"redis://127.0.0.1:{free_port()}/0"
    limiter = RateLimiter(tenant_limits(requests_per_minute=2), connect(absent))
    acme = Tenant("acme")
    assert [await admitted(limiter, acme) for _ in range(3)] == [True, True, False]
    assert "counting in this process" in caplog.text
    await limiter.close()


async def test_no_limits_cost_nothing() -> None:
    assert await RateLimiter(RateLimitConfig()).admit(Tenant("acme"), stream=True) is None


async def test_shadow_allowances_are_one_budget_across_replicas(redis_url: str) -> None:
    prefix = f"allow-{uuid.uuid4().hex[:8]}"
    clients = [connect(redis_url) for _ in range(3)]
    allowances = [Allowances(client, prefix) for client in clients]
    taken = [await allowances[n % 3].take("shadow:auto", 4) for n in range(12)]
    assert sum(taken) == 4  # per process it would have been 12
    assert await allowances[0].take("shadow:chat", 4)  # each name its own budget
    for client in clients:
        await client.aclose()


async def test_allowances_without_redis_are_per_process() -> None:
    absent = Allowances(connect(f"redis://127.0.0.1:{free_port()}/0"))
    assert [await absent.take("shadow:auto", 2) for _ in range(3)] == [True, True, False]


async def test_the_official_client_sees_429s_with_retry_after(
        gateways: GatewayRunner, upstream: str, tmp_path: Path) -> None:
    """One gateway without Redis (limits counted in its process), limits from the keys file."""
    keys = write(tmp_path / "keys.yaml", """
        tenants:
          streams:
            keys: ["sk-streams"]
            key_limits: {concurrent_streams: 1}
          tokens:
            keys: ["sk-tokens"]
            limits: {tokens_per_minute: 10}
    """)
    base = gateways.start(upstream_config(upstream, auth="on", api_keys_file=str(keys)))
    streams = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-streams", max_retries=0)
    slow = [{"role": "user", "content": "Count slowly." + script(tokens_per_s=8)}]

    async def read_stream() -> str:
        chunks = await streams.chat.completions.create(model="auto", messages=slow,
                                                       stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    first = asyncio.ensure_future(read_stream())
    await asyncio.sleep(0.5)
    with pytest.raises(openai.RateLimitError) as refused:
        await streams.chat.completions.create(model="auto", messages=slow, stream=True)
    assert refused.value.code == "rate_limit_exceeded"
    assert "1 concurrent streams" in refused.value.message
    assert refused.value.response.headers["retry-after"] == "1"
    assert (await streams.chat.completions.create(  # not a stream: not bound by the limit
        model="auto", messages=[{"role": "user", "content": "Hi"}])).choices
    assert await first  # the slot comes back when the stream ends
    assert await read_stream()

    tokens = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-tokens", max_retries=0)
    hello = [{"role": "user", "content": "Hello there"}]
    answer = await tokens.chat.completions.create(model="auto", messages=hello)
    assert answer.usage.total_tokens > 10
    await asyncio.sleep(0.2)
    with pytest.raises(openai.RateLimitError) as spent:
        await tokens.chat.completions.create(model="auto", messages=hello)
    assert "10 tokens per minute" in spent.value.message
    assert 1 <= int(spent.value.response.headers["retry-after"]) <= 60
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{base}/metrics", timeout=10)).text
    refusals = [line for line in metrics.splitlines()
                if line.startswith("smallfirst_rate_limited_total{")]
    for limit, scope in (("streams", "key"), ("tokens", "tenant")):
        labels = ('counted="process"', f'limit="{limit}"', f'scope="{scope}"')
        assert any(all(label in line for label in labels) and line.endswith(" 1.0")
                   for line in refusals), refusals
