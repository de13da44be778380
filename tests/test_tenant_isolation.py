"""Tenant isolation of the cache, end to end: under every shipped policy and both cache layers
(in-process exact; Redis exact + semantic with the real embedder and verifier), a question and
its rewording asked by one tenant are never answered from another tenant's entries, while
each tenant's own repeats are (the control that shows the cache was on). Purging a tenant
removes its entries only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from tests.conftest import POLICIES, GatewayRunner, script, upstream_config

KEYS = {"acme": "sk-acme-iso", "globex": "sk-globex-iso"}
POLICY_NAMES = ["auto", "chat", "fast", "quality"]
QUESTION = "How do I reverse a list in Python?"
REWORDED = "how do i reverse a list in python"


@dataclass
class Isolated:
    base: str
    layer: str
    config: Path
    prefix: str
    upstream: str

    def ask(self, tenant: str, text: str, policy: str, stream: bool = False,
            store: bool = True) -> str:
        """The route the answer took (`store=False`: the answer is not cached)."""
        headers = {"authorization": f"Bearer {KEYS[tenant]}"}
        if not store:
            headers["cache-control"] = "no-store"
        response = httpx.post(f"{self.base}/v1/chat/completions", timeout=30, headers=headers,
                              json={
            "model": policy, "stream": stream, "messages": [{"role": "user", "content": text}]})
        assert response.status_code == 200, response.text
        return response.headers["x-smallfirst-route"]

    def attempts(self, key: str) -> int:
        return httpx.get(f"{self.upstream}/stats").json()["keys"].get(key, 0)


@pytest.fixture(scope="module", params=["memory", "redis"])
def isolated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             upstream: str) -> Isolated:
    work = tmp_path_factory.mktemp(f"isolation-{request.param}")
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {t: {"keys": [k]} for t, k in KEYS.items()}}))
    policies = work / "policies"
    shutil.copytree(POLICIES, policies)
    for path in policies.glob("*.yaml"):
        policy = yaml.safe_load(path.read_text())
        # Behaviour, not speed: a lookup deadline no loaded machine misses; no audits, whose
        # background calls would blur the upstream's attempt counts.
        policy["cache"] = {"lookup_deadline_ms": 3000, "semantic_audit_rate": 0.0}
        path.write_text(yaml.safe_dump(policy))
    prefix = f"iso-{uuid.uuid4().hex[:6]}"
    extra = {"auth": "on", "api_keys_file": str(keys), "cache_prefix": prefix}
    if request.param == "redis":
        extra["redis_url"] = request.getfixturevalue("redis_url")
    runner = GatewayRunner(work / "run")
    (work / "run").mkdir()
    base = runner.start(upstream_config(upstream, **extra), policies=policies)
    request.addfinalizer(runner.stop_all)
    return Isolated(base, request.param, runner.last_policy_dir.parent / "config.yaml", prefix,
                    upstream)


def eventually(probe: Callable[[], str], want: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


CACHED = {"cache_exact", "cache_semantic"}


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_one_tenants_answers_never_reach_another(isolated: Isolated, policy: str) -> None:
    key = f"iso-{policy}-{uuid.uuid4().hex[:6]}"
    answer = script(text="Use reversed() or slicing with [::-1].", key=key)
    question, reworded = QUESTION + answer, REWORDED + answer

    assert isolated.ask("acme", question, policy) not in CACHED
    assert eventually(lambda: isolated.ask("acme", question, policy), "cache_exact") \
        == "cache_exact"  # the control: the cache is on for this policy and tenant
    if isolated.layer == "redis":
        assert eventually(lambda: isolated.ask("acme", reworded, policy), "cache_semantic") \
            == "cache_semantic"  # and a rewording is served to the same tenant

    seen = isolated.attempts(key)
    for text in (question, reworded):
        for stream in (False, True):  # stored nowhere, so each probe sees only acme's entries
            route = isolated.ask("globex", text, policy, stream, store=False)
            assert route not in CACHED, (text, stream)
    assert isolated.attempts(key) >= seen + 4  # every one of globex's questions reached a model
    isolated.ask("globex", question, policy)
    assert eventually(lambda: isolated.ask("globex", question, policy), "cache_exact") \
        == "cache_exact"  # from its own entry


def test_purging_a_tenant_removes_its_entries_only(isolated: Isolated, redis_url: str) -> None:
    if isolated.layer != "redis":
        pytest.skip("the in-process cache lives and dies with its process")
    client = redis.Redis.from_url(redis_url)

    def entries(tenant: str) -> int:
        return sum(1 for _ in client.scan_iter(f"{isolated.prefix}:[xs]:{tenant}:*"))

    answer = script(text="Purge me.", key=f"purge-{uuid.uuid4().hex[:6]}")
    for tenant in KEYS:
        isolated.ask(tenant, QUESTION + answer, "auto")
        assert eventually(lambda t=tenant: isolated.ask(t, QUESTION + answer, "auto"),
                          "cache_exact") == "cache_exact"
    before = {tenant: entries(tenant) for tenant in KEYS}
    assert all(before.values()), before

    subprocess.run([sys.executable, "-m", "tooling.cli", "cache", "purge", "--tenant", "acme",
                    "--config", str(isolated.config)], check=True, capture_output=True)
    assert entries("acme") == 0
    assert entries("globex") == before["globex"]
    assert isolated.ask("acme", QUESTION + answer, "auto") not in CACHED
    assert isolated.ask("globex", QUESTION + answer, "auto") == "cache_exact"
    client.close()
