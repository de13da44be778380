"""Slow clients against a real gateway process: request heads trickled or endless (slowloris),
bodies that never finish, and a reader that never reads its stream. Each is bounded, then cut,
and what the gateway had started upstream is closed."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import closing

import httpx
import pytest

from tests.conftest import GatewayRunner, script, upstream_config

LIMIT_S = 1.0  # every client deadline of the gateway under test


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[str]:
    runner = GatewayRunner(tmp_path_factory.mktemp("slow"))
    yield runner.start(upstream_config(
        upstream, header_timeout_s=LIMIT_S, body_timeout_s=LIMIT_S, send_timeout_s=LIMIT_S,
        max_body_bytes=48 * 1024 * 1024))
    runner.stop_all()
    assert "Traceback" not in runner.last_process.log.read_text()


def connect(base: str, receive_buffer: int | None = None) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:  # set before connecting, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    return sock


def trickle(sock: socket.socket, pieces: list[bytes], every_s: float) -> bool:
    """Send pieces one by one; False as soon as the server has closed the connection."""
    for piece in pieces:
        try:
            sock.sendall(piece)
        except OSError:
            return False
        time.sleep(every_s)
    return True


def read_to_close(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


def in_flight(base: str) -> float:
    line = next(line for line in httpx.get(f"{base}/metrics").text.splitlines()
                if line.startswith("smallfirst_requests_in_flight"))
    return float(line.rsplit(" ", 1)[1])


def test_an_idle_connection_is_closed(slow_gateway: str) -> None:
    with closing(connect(slow_gateway)) as sock:
        reply = read_to_close(sock)  # returns only once the server closed it
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


def test_headers_trickled_a_line_at_a_time_are_cut(slow_gateway: str) -> None:
    lines = [b"GET /healthz HTTP/1.1\r\n", *[b"x-slow-%d: 1\r\n" % i for i in range(60)]]
    with closing(connect(slow_gateway)) as sock:
        finished = trickle(sock, lines, every_s=0.2)  # 12 s of headers, each line in time
        assert not finished, "the server waited for the whole trickle"
        assert read_to_close(sock).startswith(b"HTTP/1.1 408 ")


def test_endless_headers_are_refused(slow_gateway: str) -> None:
    lines = [b"GET /healthz HTTP/1.1\r\n", *[b"x-pad-%d: %s\r\n" % (i, b"a" * 8000)
                                            for i in range(200)]]
    with closing(connect(slow_gateway)) as sock:
        assert not trickle(sock, lines, every_s=0), "1.6 MB of headers were all accepted"
        reply = read_to_close(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]


def test_a_body_that_never_finishes_gets_a_408(slow_gateway: str) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: 1000\r\n\r\n{")
    with closing(connect(slow_gateway)) as sock:
        assert not trickle(sock, [head, *[b" "] * 60], every_s=0.2)
        reply = read_to_close(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "did not arrive" in error["message"]


def test_a_slowloris_crowd_does_not_starve_real_clients(slow_gateway: str) -> None:
    crowd = [connect(slow_gateway) for _ in range(64)]
    try:
        for sock in crowd:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nx-slow: ")
        answer = httpx.post(f"{slow_gateway}/v1/chat/completions", timeout=30, json={
            "model": "auto", "messages": [{"role": "user", "content": "hello, anyone?"}]})
        assert answer.status_code == 200
        closed = 0
        for sock in crowd:  # every one of them was cut, none left holding a descriptor
            closed += read_to_close(sock).startswith(b"HTTP/1.1 408 ")
        assert closed == len(crowd)
    finally:
        for sock in crowd:
            sock.close()


def test_a_reader_that_never_reads_is_cut_and_the_upstream_call_closed(
        slow_gateway: str, upstream: str) -> None:
    """A stream far larger than the socket buffers, to a client that reads nothing: the
    gateway gives up after its send deadline, closes the upstream stream it was relaying
    (the upstream counts it as cancelled) and the request leaves the in-flight gauge."""
    key = f"never-reads-{uuid.uuid4().hex[:8]}"
    # 300 pieces of 100 kB, 30 s at 10 a second: far more than the socket buffers on the way
    # (megabytes each) hold, so the gateway's sends block long before the answer is over.
    words = " ".join(["w" * 100_000] * 300)
    body = json.dumps({"model": "fast", "stream": True, "messages": [{"role": "user", "content": (
        "hi" + script(text=words, tokens_per_s=10, key=key))}]}).encode()
    with closing(connect(slow_gateway, receive_buffer=4096)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        cancelled = 0
        for _ in range(250):  # the answer would take 30 s; the cut comes long before
            stats = httpx.get(f"{upstream}/stats").json()
            cancelled = stats["cancelled"].get(key, 0)
            if cancelled:
                break
            time.sleep(0.1)
        assert cancelled == 1, stats
        assert stats["keys"][key] == 1  # and it was not retried elsewhere
        deadline = time.monotonic() + 10
        while in_flight(slow_gateway) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert in_flight(slow_gateway) == 0


def test_an_idle_connection_outlives_the_clients_own_keep_alive(slow_gateway: str) -> None:
    """Clients (httpx: 5 s, aiohttp: 15 s) and load balancers drop idle connections first;
    were the gateway to close one as a client reuses it, that request would fail."""
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
    with closing(connect(slow_gateway)) as sock:
        sock.sendall(request)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # idle past uvicorn's default keep-alive (5 s) and the head's 1 s
        sock.sendall(request)
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a content-length body) from a kept-alive connection."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    head, body = reply.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return reply
