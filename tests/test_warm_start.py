"""A gateway is ready only once its models have run: /readyz waits for the warm-up."""

from __future__ import annotations

import time

import httpx

from tests.conftest import GatewayRunner, free_port, upstream_config


def readyz(base: str) -> httpx.Response:
    return httpx.get(f"{base}/readyz", timeout=10)


def test_ready_once_the_small_model_answered_a_warm_up(session_gateways: GatewayRunner,
                                                       upstream: str) -> None:
    base = session_gateways.start(upstream_config(upstream))
    response = readyz(base)
    assert response.status_code == 200
    assert response.json()["checks"] == {"small_model": True, "policies": True,
                                         "warmed_up": True, "not_draining": True}
    log = session_gateways.last_process.log.read_text()
    assert "ready: warmed up in" in log


def test_not_ready_while_the_small_model_is_away(session_gateways: GatewayRunner,
                                                 upstream: str) -> None:
    absent = f"http://127.0.0.1:{free_port()}/v1"
    base = session_gateways.start(upstream_config(upstream, small_api_base=absent))
    response = readyz(base)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["warmed_up"] is False and checks["small_model"] is False
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200  # alive all the same
    log = session_gateways.last_process.log
    deadline = time.monotonic() + 30  # the local models load first; slow on a busy machine
    while "does not answer yet" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "does not answer yet" in log.read_text()
    assert readyz(base).status_code == 503  # still away after the retries


def test_the_first_repeat_after_start_is_an_exact_hit_at_the_default_deadline(
        session_gateways: GatewayRunner, upstream: str, redis_url: str) -> None:
    """Models load before /readyz says ready, and the exact entry is written without waiting
    for the embedding: the shipped 10 ms lookup deadline serves the first repeat."""
    import uuid

    from tests.conftest import script

    base = session_gateways.start(upstream_config(
        upstream, redis_url=redis_url, cache_prefix=f"warm-{uuid.uuid4().hex[:6]}"))
    body = {"model": "auto", "messages": [
        {"role": "user", "content": "What is the capital of Chile?" + script(text="Santiago.")}]}
    first = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
    assert first.headers["x-smallfirst-route"] == "small"
    routes = []
    for _ in range(50):  # the write lands just after the first response
        routes.append(httpx.post(f"{base}/v1/chat/completions", json=body,
                                 timeout=30).headers["x-smallfirst-route"])
        if routes[-1] == "cache_exact":
            break
        time.sleep(0.05)
    assert routes[-1] == "cache_exact", routes
