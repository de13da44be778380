"""The OpenTelemetry collector down or hung: requests never wait on telemetry, and shutdown
does not wait out the exporter's timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import GatewayRunner, upstream_config

EXPORTER_TIMEOUT_S = 30  # what a hung collector would cost a shutdown that waits for it
SHUTDOWN_BOUND_S = 15  # generous for a loaded machine, still well under the timeout


@pytest.fixture
def hung_collector() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("collector", ["hung", "down"])
def test_requests_and_shutdown_do_not_wait_on_the_collector(
        gateways: GatewayRunner, upstream: str, hung_collector: str, collector: str) -> None:
    endpoint = hung_collector if collector == "hung" else "http://127.0.0.1:9"
    base = gateways.start(upstream_config(upstream), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TIMEOUT": str(EXPORTER_TIMEOUT_S * 1000),  # ms (spec) ...
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": str(EXPORTER_TIMEOUT_S),  # ... s (this SDK)
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    })

    def ask(n: int) -> int:
        body = {"model": "auto", "stream": n % 2 == 0,
                "messages": [{"role": "user", "content": f"telemetry {n}"}]}
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=20).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(12))) == [200] * 12
    time.sleep(1.5)  # exports are now in flight, hung on the collector

    process = gateways.last_process.proc
    began = time.monotonic()
    process.terminate()
    process.wait(EXPORTER_TIMEOUT_S * 2)
    log = gateways.last_process.log.read_text()[-2000:]
    assert time.monotonic() - began < SHUTDOWN_BOUND_S, log
    assert "Application shutdown complete" in log  # a clean exit, not a kill
