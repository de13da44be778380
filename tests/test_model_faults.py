"""The embedder or a router bundle failing: the semantic cache and difficulty scoring are
skipped, the policy's default route serves, and /readyz and the metrics say so. The gateway
runs in process (its embedder swapped for one that cannot load) over real HTTP, with the
scripted upstream and a real Valkey."""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from openai import AsyncOpenAI

from gateway.api.app import create_app
from gateway.config import Settings
from gateway.service import Gateway
from tests.conftest import POLICIES, free_port, upstream_config


def broken_embedder() -> None:
    raise OSError("model.onnx: no such file")


@pytest.fixture
async def gateway(tmp_path: Path, upstream: str, redis_url: str) -> AsyncIterator[str]:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bundle.json").write_text("not a bundle")
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    auto["difficulty"] = {"scorer": "learned", "bundle": str(tmp_path / "broken"),
                          "skip_threshold": 0.5}
    auto["confidence"] = {"scorer": "accept_all"}
    auto["cache"] = {"lookup_deadline_ms": 1000}
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    settings = Settings(**upstream_config(
        upstream, redis_url=redis_url, cache_prefix=f"models-{uuid.uuid4().hex[:6]}",
        auth="off", policies=policies, watch_policies=False))
    service = Gateway.from_settings(settings)
    service.embed._factory = broken_embedder  # the embedder cannot load
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not service.warmed_up:
        assert not serving.done(), "the gateway did not start"
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await serving


async def ask(base: str, text: str, *, stream: bool) -> str:
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": text}]
    if stream:
        async with client.chat.completions.with_streaming_response.create(
                model="auto", messages=messages, stream=True) as raw:
            assert [c async for c in await raw.parse()]
            route, scores = raw.headers["x-smallfirst-route"], raw.headers["x-smallfirst-scores"]
    else:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=messages)
        assert raw.parse().choices[0].message.content
        route, scores = raw.headers["x-smallfirst-route"], raw.headers["x-smallfirst-scores"]
    assert "difficulty" not in scores  # not scored
    return route


async def test_a_broken_embedder_and_bundle_fall_back_to_the_default_route(
        gateway: str) -> None:
    for stream in (False, True):
        assert await ask(gateway, f"What is 2 + 2? {stream}", stream=stream) == "small"
    async with httpx.AsyncClient(timeout=10) as client:
        ready = await client.get(f"{gateway}/readyz")
        metrics = (await client.get(f"{gateway}/metrics")).text
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    degraded = ready.json()["degraded"]
    assert "embedder" in degraded and any(k.startswith("router_bundle:") for k in degraded)
    for component in ("embedder", "router_bundle"):
        assert re.search(rf'^smallfirst_degraded{{component="{component}"[^}}]*}} 1.0$',
                         metrics, re.M), component
    # The exact layer needs no embedding: repeats are still hits.
    for stream in (False, True):
        await asyncio.sleep(0.3)
        assert await ask(gateway, f"What is 2 + 2? {stream}", stream=stream) == "cache_exact"
