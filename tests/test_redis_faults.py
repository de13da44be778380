"""Redis failing under a gateway process: down at start, paused, slow, killed under load and
restarted empty. Requests are always served (as cache misses), `/readyz` stays ready and says
what the cache is doing without, the index comes back and hits resume on their own, and no
cache entry is ever left without its answer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from openai import OpenAI

from gateway.types import CachedAnswer
from tests.conftest import POLICIES, GatewayRunner, RedisServer, script, upstream_config

ANSWER = script(text="Use the reversed() function or slicing.")
TIMEOUT_S = 20.0  # a hang fails the request; no speed is asserted


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)  # not started: each test decides when Redis is there
    yield server
    if server.process is not None and server.process.proc.poll() is None:
        os.kill(server.process.proc.pid, signal.SIGCONT)
    server.kill()


def start_gateway(gateways: GatewayRunner, upstream: str, tmp_path: Path,
                  valkey: RedisServer, prefix: str) -> str:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    auto["cache"] = {"lookup_deadline_ms": 1000}  # behaviour, not speed, on a loaded machine
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    return gateways.start(upstream_config(upstream, redis_url=valkey.url, cache_prefix=prefix),
                          policies=policies)


def ask(base: str, text: str, *, stream: bool) -> str:
    """The route of one request through the official client; its answer must be whole."""
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
    messages = [{"role": "user", "content": text}]
    if not stream:
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)
        assert raw.parse().choices[0].message.content
        return raw.headers["x-smallfirst-route"]
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=messages, stream=True) as raw:
        pieces = [c.choices[0].delta.content or "" for c in raw.parse() if c.choices]
        assert "".join(pieces).strip()
        return raw.headers["x-smallfirst-route"]


def both(base: str, text: str) -> list[str]:
    return [ask(base, text, stream=False), ask(base, text, stream=True)]


def degraded(base: str) -> dict[str, str]:
    response = httpx.get(f"{base}/readyz", timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text  # degraded, never failing the pod
    return response.json()["degraded"]


def eventually(probe: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def hits(base: str, text: str, kind: str = "cache_exact") -> bool:
    return both(base, text) == [kind, kind]


def signal_valkey(server: RedisServer, sig: signal.Signals) -> None:
    assert server.process is not None
    os.kill(server.process.proc.pid, sig)


def assert_no_half_entries(server: RedisServer, prefix: str) -> None:
    """Every exact and semantic entry carries its whole answer."""
    client = redis.Redis.from_url(server.url)
    exact = list(client.scan_iter(f"{prefix}:x:*"))
    semantic = list(client.scan_iter(f"{prefix}:s:*"))
    assert exact and semantic
    for key in exact:
        assert CachedAnswer.from_json(json.loads(client.get(key))).content, key
    for key in semantic:
        answer = json.loads(client.hget(key, "answer"))
        assert CachedAnswer.from_json(answer).content, key
    client.close()


def test_down_at_start_then_back(gateways: GatewayRunner, upstream: str, tmp_path: Path,
                                 valkey: RedisServer) -> None:
    prefix = f"down-{uuid.uuid4().hex[:6]}"
    base = start_gateway(gateways, upstream, tmp_path, valkey, prefix)
    question = "How do I reverse a list in Python?" + ANSWER
    assert both(base, question) == ["small", "small"]  # served, nothing cached
    assert both(base, question) == ["small", "small"]
    assert "cache" in degraded(base)
    valkey.start()
    assert eventually(lambda: hits(base, question)), "the cache did not come back"
    # The index was created once Redis answered: a paraphrase is a semantic hit.
    assert eventually(lambda: ask(base, "how do i reverse a list in python" + ANSWER,
                                  stream=False) == "cache_semantic")
    assert eventually(lambda: degraded(base) == {})
    assert_no_half_entries(valkey, prefix)


def test_paused_slow_killed_and_restarted_empty(gateways: GatewayRunner, upstream: str,
                                                tmp_path: Path, valkey: RedisServer) -> None:
    prefix = f"faults-{uuid.uuid4().hex[:6]}"
    valkey.start()
    base = start_gateway(gateways, upstream, tmp_path, valkey, prefix)
    question = "What is the capital of France?" + ANSWER
    both(base, question)
    assert eventually(lambda: hits(base, question))

    # Paused: every call hangs. Requests are misses within the lookup deadline, and the
    # hung calls' timeouts open the circuit (readyz says so).
    signal_valkey(valkey, signal.SIGSTOP)
    for n in range(4):
        assert both(base, f"paused {n}?" + ANSWER) == ["small", "small"]
    assert eventually(lambda: "cache" in degraded(base))
    signal_valkey(valkey, signal.SIGCONT)
    assert eventually(lambda: hits(base, question)), "hits did not resume after SIGCONT"

    # Slow: the server stalls every client for 400 ms at a time (CLIENT PAUSE), over and
    # over. Requests keep being served.
    with slow(valkey):
        for n in range(4):
            routes = both(base, f"slow {n}?" + ANSWER)
            assert set(routes) <= {"small", "cache_exact"}
    assert eventually(lambda: hits(base, question))

    # Killed under load: every request still answered.
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, base, f"load {n}?" + ANSWER, stream=n % 2 == 0)
                   for n in range(32)]
        time.sleep(0.2)
        valkey.kill()
        routes = [f.result() for f in futures]
    assert set(routes) <= {"small", "cache_exact"}
    assert both(base, question) == ["small", "small"]
    assert eventually(lambda: "cache" in degraded(base))

    # Restarted empty: the index is gone; the next lookup recreates it, and the entries
    # written from then on are hits again, exact and semantic.
    valkey.start()
    fresh = "How do I reverse a list in Python?" + ANSWER
    assert eventually(lambda: hits(base, fresh)), "the cache did not resume after a restart"
    assert eventually(lambda: ask(base, "how do i reverse a list in python" + ANSWER,
                                  stream=True) == "cache_semantic")
    assert eventually(lambda: degraded(base) == {})
    assert_no_half_entries(valkey, prefix)


class slow:
    """Context manager: Redis stalls all clients for `pause_ms` every `every_s`."""

    def __init__(self, server: RedisServer, pause_ms: int = 400, every_s: float = 0.5) -> None:
        self.port, self.pause_ms, self.every_s = server.port, pause_ms, every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(f"CLIENT PAUSE {self.pause_ms} ALL\r\n".encode())
                sock.recv(64)
            self.done.wait(self.every_s)

    def __enter__(self) -> slow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
