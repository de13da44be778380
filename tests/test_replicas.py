"""Three gateway replicas behind a real HAProxy, sharing one Valkey (the scenarios of
`load/replicas.py`, smaller): a shared cache, one rate limit across replicas, one decision
stream, and no client error when a replica is stopped under load, few when it is killed."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from load.replicas import Replicas, haproxy_binary, replica_config, scenarios
from router.traffic import read_log
from tests.conftest import GatewayRunner, RedisServer, script, upstream_config

LIMIT = 5


@pytest.fixture
def replicas(tmp_path: Path, upstream: str, redis_server: RedisServer) -> Iterator[Replicas]:
    if haproxy_binary() is None:
        pytest.skip("haproxy is not installed (make test installs Debian's package)")
    prefix = f"replicas-{uuid.uuid4().hex[:6]}"
    cluster = Replicas(tmp_path, replica_config(upstream, redis_server.url, prefix, LIMIT,
                                                tmp_path))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_three_replicas_behind_haproxy_share_state_and_survive_losing_one(
        replicas: Replicas) -> None:
    args = argparse.Namespace(questions=3, tries=5, limit=LIMIT, seconds=4.0, concurrency=6)
    figures = asyncio.run(scenarios(replicas, args))

    assert figures["cache"]["cross_replica_hits"] == 3  # cached via one, served by the next

    stream = figures["decision_stream"]
    assert stream["rows_landed_by_replica"] == {0: 3, 1: 3, 2: 3}
    # the trainer reads the same stream
    url = f"{replicas.config['redis_url']}?stream={stream['stream']}"
    assert len(list(read_log([url]))) >= stream["rows_sent"]

    limited = figures["rate_limit"]
    assert limited["admitted"] == LIMIT and limited["other"] == []
    assert limited["refused_429"] == limited["sent"] - LIMIT
    assert limited["replicas_answering"] >= 2  # the count is shared, not per replica
    refusal = limited["refusal_example"]
    assert refusal["retry_after"].isdigit()
    assert refusal["body"]["error"]["code"] == "rate_limit_exceeded"

    stopped = figures["sigterm"]
    assert stopped["in_flight_at_signal"] > 0 and stopped["requests_1s_after"] > 0
    assert stopped["errors"] == 0, stopped["error_examples"]
    assert stopped["victim_exit_code"] == 0
    assert "draining" in replicas.log(0)

    killed = figures["sigkill"]  # lost: only what was on the killed replica, then none
    assert killed["victim_exit_code"] == -signal.SIGKILL
    assert killed["errors_on_other_replicas"] == 0, killed["error_examples"]
    assert killed["errors_sent_later"] == 0, killed["error_examples"]
    assert killed["requests_1s_after"] > 0 and killed["served_by_victim_1s_after"] == 0


def test_sigterm_fails_readiness_first_then_finishes_what_is_in_flight(
        gateways: GatewayRunner, upstream: str) -> None:
    base = gateways.start(upstream_config(upstream, shutdown_drain_s=2.0))
    process = gateways.last_process.proc
    slow = {"model": "auto", "stream": True, "messages": [
        {"role": "user", "content": "Take your time." + script(tokens_per_s=4)}]}  # ~4 s
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{base}/v1/chat/completions", json=slow) as stream:
        assert stream.status_code == 200
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = client.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["not_draining"] is False
        # still serving while the balancer routes away
        assert client.post(f"{base}/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
        assert stream.read().decode().rstrip().endswith("data: [DONE]")
    assert process.wait(30) == 0
