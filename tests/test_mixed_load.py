"""Mixed traffic (cache hits, small, escalated, streamed, tool calls, clients leaving) through
a gateway process with Redis: no 5xx of the gateway's own making, every request accounted for
in the metrics and the access log; and a short soak: no descriptor or task growth.

The long soak is a benchmark (`python -m load.soak`), not a test."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter

import httpx

from load import soak
from tests.conftest import GatewayRunner, upstream_config


def start(gateways: GatewayRunner, upstream: str, redis_url: str) -> str:
    return gateways.start(upstream_config(
        upstream, redis_url=redis_url, cache_prefix=f"mixed-{uuid.uuid4().hex[:6]}"))


def access_log(gateways: GatewayRunner, expected: int, timeout: float = 5.0) -> list[dict]:
    """The access log's entries, once `expected` of them are written (a writer thread flushes
    them off the event loop every 100 ms) or the timeout passed."""
    prefix = "INFO smallfirst.access "
    deadline = time.monotonic() + timeout
    while True:
        entries = [json.loads(line[len(prefix):])
                   for line in gateways.last_process.log.read_text().splitlines()
                   if line.startswith(prefix)]
        if len(entries) >= expected or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


async def test_every_request_is_served_and_accounted_for(
        gateways: GatewayRunner, upstream: str, redis_url: str) -> None:
    base = start(gateways, upstream, redis_url)
    outcomes: Counter[str] = Counter()
    sent = await soak.traffic(base, duration_s=15, rate=8, outcomes=outcomes)
    metrics = await soak.quiesce(base)

    assert sum(outcomes.values()) == sent
    assert set(outcomes) <= {"200", "left"}, outcomes  # no 5xx, no transport error
    assert outcomes["left"] > 0
    logged = access_log(gateways, sent)
    assert len(logged) == sent
    statuses = Counter(str(entry["status"]) for entry in logged)
    assert not [s for s in statuses if s.startswith("5")], statuses
    # A client that left is a 499 (or a 200 when the stream ended first).
    assert statuses["200"] + statuses["499"] == sent, statuses
    assert statuses["200"] >= outcomes["200"]
    assert soak.gauge(metrics, "smallfirst_requests_total") == sent
    routes = Counter(entry["route"] for entry in logged)
    assert {"small", "escalated", "cache_exact"} <= set(routes), routes
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{base}/readyz")).json()["degraded"] == {}


async def test_short_soak_grows_no_descriptor_or_task(
        gateways: GatewayRunner, upstream: str, redis_url: str) -> None:
    base = start(gateways, upstream, redis_url)
    pid = gateways.last_process.proc.pid
    result = await soak.run(base, pid, redis_url, duration_s=60, every_s=10, rate=8)
    assert set(result.outcomes) <= {"200", "left"}, result.outcomes
    assert len(result.samples) >= 3
    assert not result.leaked(warmup=1), (result.samples, result.growth(1))


def test_refused_requests_are_counted_too(gateways: GatewayRunner, upstream: str) -> None:
    """A request turned away before admission (here a bad body) is in both sinks."""
    base = gateways.start(upstream_config(upstream))
    assert httpx.post(f"{base}/v1/chat/completions", content=b"{", timeout=10).status_code == 400
    text = asyncio.run(soak.quiesce(base))
    assert soak.gauge(text, "smallfirst_requests_total") == 1
    assert [entry["status"] for entry in access_log(gateways, 1)] == [400]
