"""End to end: the official `openai` client through a gateway process with Redis caching."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from tests.conftest import POLICIES, GatewayRunner, script, upstream_config

CONFIGS: dict[str, Path] = {}
KEYS = {"tenants": {"acme": {"keys": ["sk-acme"]}, "globex": {"keys": ["sk-globex"]}}}


@pytest.fixture(scope="module")
def cached_gateway(session_gateways: GatewayRunner, upstream: str, redis_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("cached")
    (work / "keys.yaml").write_text(yaml.safe_dump(KEYS))
    policies = work / "policies"
    shutil.copytree(POLICIES, policies)
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    # Tests assert behaviour, not speed: a lookup deadline no loaded test machine misses.
    auto["cache"] = {"lookup_deadline_ms": 3000}
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    base = session_gateways.start(upstream_config(
        upstream, redis_url=redis_url, cache_prefix=f"e2e-{uuid.uuid4().hex[:6]}",
        auth="on", api_keys_file=str(work / "keys.yaml")), policies=policies)
    CONFIGS[base] = session_gateways.last_policy_dir.parent / "config.yaml"
    return base


def client(base: str, key: str = "sk-acme") -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def ask(base: str, text: str, key: str = "sk-acme", **extra: Any) -> tuple[Any, str]:
    raw = client(base, key).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], **extra)
    return raw.parse(), raw.headers["x-smallfirst-route"]


def eventually(probe: Callable[[], str], want: str, timeout: float = 5.0) -> str:
    """Cache writes land just after the response: poll until the route shows them."""
    deadline = time.monotonic() + timeout
    while True:
        route = probe()
        if route == want or time.monotonic() > deadline:
            return route
        time.sleep(0.05)


def test_repeat_is_an_exact_hit_with_zero_usage(cached_gateway: str) -> None:
    text = "What is the capital of Peru?" + script(text="Lima is the capital of Peru.")
    first, route = ask(cached_gateway, text)
    assert route == "small"
    assert eventually(lambda: ask(cached_gateway, text)[1], "cache_exact") == "cache_exact"
    again, _ = ask(cached_gateway, text)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.total_tokens == 0


def test_streamed_hit_equals_the_original(cached_gateway: str) -> None:
    text = "Name three primes." + script(text="Two, three and five are primes.")

    def stream() -> tuple[list[str], str]:
        with client(cached_gateway).chat.completions.with_streaming_response.create(
                model="auto", stream=True,
                messages=[{"role": "user", "content": text}]) as response:
            route = response.headers["x-smallfirst-route"]
            pieces = [c.choices[0].delta.content for c in response.parse()
                      if c.choices and c.choices[0].delta.content]
        return pieces, route

    original, _ = stream()
    assert eventually(lambda: stream()[1], "cache_exact") == "cache_exact"
    replay, route = stream()
    assert route == "cache_exact"
    assert replay == original and len(replay) > 1


def test_no_cache_header_skips_the_read(cached_gateway: str) -> None:
    text = "Define entropy." + script(text="A measure of disorder.")
    ask(cached_gateway, text)
    assert eventually(lambda: ask(cached_gateway, text)[1], "cache_exact") == "cache_exact"
    _, route = ask(cached_gateway, text, extra_headers={"Cache-Control": "no-cache"})
    assert route == "small"


def test_reworded_question_is_a_semantic_hit_for_its_tenant_only(cached_gateway: str) -> None:
    answer = script(text="Use the reversed() function or slicing.")
    ask(cached_gateway, "How do I reverse a list in Python?" + answer)
    time.sleep(0.3)
    reworded = "how do i reverse a list in python" + answer
    assert eventually(lambda: ask(cached_gateway, reworded)[1], "cache_semantic") \
        == "cache_semantic"
    _, other_tenant = ask(cached_gateway, reworded, key="sk-globex")
    assert other_tenant == "small"


def test_cli_stats_and_purge(cached_gateway: str) -> None:
    import json
    import subprocess
    import sys

    config = CONFIGS[cached_gateway]
    run = [sys.executable, "-m", "tooling.cli", "cache"]
    stats = json.loads(subprocess.run([*run, "stats", "--config", str(config)], check=True,
                                      capture_output=True, text=True).stdout)
    assert stats["entries"] >= 1 and "acme/auto" in stats["entries_by_scope"]
    out = subprocess.run([*run, "purge", "--tenant", "acme", "--config", str(config)],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("purged")
    text = "What is the capital of Peru?" + script(text="Lima is the capital of Peru.")
    assert ask(cached_gateway, text)[1] == "small"
