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
                                         "warmed_up": True}
    log = session_gateways.last_process.log.read_text()
    assert "ready: warmed up in" in log


def test_not_ready_while_the_small_model_is_away(session_gateways: GatewayRunner,
                                                 upstream: str) -> None:
    absent = f"http://127.0.0.1:{free_port()}/v1"
    base = session_gateways.start(upstream_config(upstream, small_api_base=absent))
    time.sleep(1.5)  # a retry or two of the warm-up
    response = readyz(base)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["warmed_up"] is False and checks["small_model"] is False
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200  # alive all the same
    assert "does not answer yet" in session_gateways.last_process.log.read_text()
