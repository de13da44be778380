"""Overload: requests refused (429), cancelled by deadlines or left by their clients must each
close their upstream connection. A gateway process is overloaded, then its descriptors and
its sockets to the small model are counted from /proc: back to the baseline, none in
CLOSE-WAIT."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from load.procstat import open_fds, tcp_sockets
from tests.conftest import GatewayRunner, Process, free_port, script, upstream_config, wait_http

MAX_IN_FLIGHT = 16


@pytest.fixture
def small_upstream(tmp_path: Path) -> Iterator[int]:
    """A scripted upstream of its own playing the small model: its sockets are the ones
    counted."""
    port = free_port()
    process = Process([sys.executable, "-m", "load.upstream", "--port", str(port)],
                      tmp_path / "small.log")
    wait_http(f"http://127.0.0.1:{port}/health", process.proc, tmp_path / "small.log")
    yield port
    process.stop()


def request(base: str, kind: str, n: int) -> str:
    """One request of a kind; returns how it ended, as the client saw it."""
    text = f"overload {kind} {n}"
    body: dict = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    timeout = 30.0
    if kind == "reader_leaves":  # a long stream whose reader goes after the first bytes
        body["stream"] = True
        body["messages"][0]["content"] += script(tokens_per_s=10, output_tokens=80)
    elif kind == "stalls":  # the small model stalls past its deadline; the frontier too
        body["messages"][0]["content"] += script(stall_after_tokens=2, stall_ms=8000)
        timeout = 3.0
    elif kind == "client_leaves":  # the client gives up before the first token
        body["messages"][0]["content"] += script(ttft_ms=3000)
        timeout = 0.5
    headers = {"cache-control": "no-cache, no-store"}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                          timeout=timeout) as response:
            if response.status_code == 200 and body.get("stream"):
                next(response.iter_bytes())
                return "left"
            response.read()
            return str(response.status_code)
    except httpx.TimeoutException:
        return "timed_out"


def settled(base: str, pid: int, small_port: int) -> tuple[int, Counter[str]]:
    """Descriptors and small-model sockets once the pools have dropped what they may keep."""
    time.sleep(6)  # past the pool's 5 s keep-alive expiry
    for n in range(2):  # a request makes the pool close its expired and dead connections
        assert request(base, "plain", n) == "200"
    return open_fds(pid), tcp_sockets(pid, small_port)


def test_overload_leaves_no_socket_or_descriptor_behind(
        gateways: GatewayRunner, upstream: str, small_upstream: int) -> None:
    base = gateways.start(upstream_config(
        upstream, small_api_base=f"http://127.0.0.1:{small_upstream}/v1",
        max_in_flight=MAX_IN_FLIGHT))
    pid = gateways.last_process.proc.pid
    for n in range(4):
        request(base, "plain", n)
    fds_before, sockets_before = settled(base, pid, small_upstream)

    kinds = ["reader_leaves", "stalls", "client_leaves", "plain"] * 40
    with ThreadPoolExecutor(40) as pool:
        outcomes = Counter(pool.map(lambda kn: request(base, kn[1], kn[0]), enumerate(kinds)))
    assert outcomes["429"] > 0, outcomes  # it was overloaded
    assert set(outcomes) <= {"200", "429", "left", "timed_out"}, outcomes
    time.sleep(8)  # the stalled upstream calls end (or were cancelled)

    fds_after, sockets_after = settled(base, pid, small_upstream)
    assert sockets_after["CLOSE_WAIT"] == 0, sockets_after
    assert sockets_after["ESTABLISHED"] <= max(sockets_before["ESTABLISHED"], 2), sockets_after
    assert fds_after <= fds_before + 4, (fds_before, fds_after, sockets_after)


async def test_a_stream_closed_before_its_first_read_closes_its_connection(
        upstream: str) -> None:
    """A request cancelled between the small model's headers and its first chunk."""
    import os

    from gateway.backends import OpenAIWireBackend
    from gateway.config import BackendConfig

    backend = OpenAIWireBackend(BackendConfig(model="hosted_vllm/small",
                                              api_base=f"{upstream}/v1"))
    slow = {"messages": [{"role": "user", "content": "x" + script(tokens_per_s=5)}]}
    port = int(upstream.rsplit(":", 1)[1])
    try:
        for _ in range(5):
            chunks = await backend.stream(slow, timeout=30)
            await chunks.aclose()
        # The transport closes its socket on the loop's next turn: give it a few.
        for _ in range(20):
            if tcp_sockets(os.getpid(), port)["ESTABLISHED"] == 0:
                break
            await asyncio.sleep(0.05)
        assert tcp_sockets(os.getpid(), port)["ESTABLISHED"] == 0
    finally:
        await backend.aclose()
