"""Hostile request bodies against a real gateway (Redis cache, scripted upstream models): each
gets a clear OpenAI-shaped 4xx, or a normal answer where it is valid; memory stays bounded; and
nothing refused or failed is ever written to the cache."""

from __future__ import annotations

import json
import select
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import GatewayRunner, script, upstream_config
from tests.test_fuzz import assert_openai_error

MAX_BODY = 4 * 1024 * 1024  # the default limit


@dataclass
class Hostile:
    base: str
    pid: int
    prefix: str
    redis: redis.Redis

    def post(self, content: bytes, **headers: str) -> httpx.Response:
        return httpx.post(f"{self.base}/v1/chat/completions", content=content, timeout=60,
                          headers={"content-type": "application/json", **headers})

    def cached(self) -> list[str]:
        return sorted(k.decode() for k in self.redis.scan_iter(f"{self.prefix}:[xs]:*"))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:"))) / 1024


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, upstream: str,
            redis_url: str) -> Iterator[Hostile]:
    runner = GatewayRunner(tmp_path_factory.mktemp("hostile"))
    prefix = f"hostile{uuid.uuid4().hex[:8]}"
    base = runner.start(upstream_config(upstream, redis_url=redis_url, cache_prefix=prefix))
    client = redis.Redis.from_url(redis_url)
    yield Hostile(base, runner.last_process.proc.pid, prefix, client)
    client.close()
    runner.stop_all()
    assert "Traceback" not in runner.last_process.log.read_text()


def chat(text: str, **extra: object) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def body(value: object) -> bytes:
    return json.dumps(value).encode()


HEAD = b'{"model":"auto","messages":[{"role":"user","content":"hi"}]'
REFUSED: dict[str, tuple[bytes, int, str]] = {
    # name: (body, status, what the message says)
    "deeply-nested-array": (b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper"),
    "deeply-nested-field": (HEAD + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
                            "nests deeper"),
    "nested-past-the-limit": (HEAD + b',"x":' + b"[" * 70 + b"]" * 70 + b"}", 400,
                              "nests deeper"),
    "invalid-utf8": (HEAD[:-1] + b',"user":"\xff\xfe"}', 400, "could not parse"),
    "lone-surrogate": (HEAD.replace(b'"hi"', b'"a\\ud800b"') + b"}", 400, "lone surrogate"),
    "number-past-digit-limit": (HEAD + b',"max_tokens":' + b"9" * 5000 + b"}", 400,
                                "could not parse"),
    "negative-max-tokens": (body(chat("hi", max_tokens=-1)), 400, "'max_tokens'"),
    "zero-max-tokens": (body(chat("hi", max_completion_tokens=0)), 400,
                        "'max_completion_tokens'"),
    "huge-temperature": (body(chat("hi", temperature=1e308)), 400, "'temperature'"),
    "negative-temperature": (body(chat("hi", temperature=-0.1)), 400, "'temperature'"),
    "infinite-temperature": (HEAD + b',"temperature":Infinity}', 400, "'temperature'"),
    "nan-top-p": (HEAD + b',"top_p":NaN}', 400, "'top_p'"),
    "huge-top-logprobs": (body(chat("hi", logprobs=True, top_logprobs=10**30)), 400,
                          "'top_logprobs'"),
    "negative-top-logprobs": (body(chat("hi", logprobs=True, top_logprobs=-1)), 400,
                              "'top_logprobs'"),
    "float-max-tokens": (body(chat("hi", max_tokens=1e300)), 400, "'max_tokens'"),
    "five-stop-sequences": (body(chat("hi", stop=list("abcde"))), 400, "'stop'"),
    "n-above-one": (body(chat("hi", n=5)), 400, "only n=1"),
    "no-messages": (body({"model": "auto", "messages": []}), 400, "'messages'"),
    "unknown-role": (body({"model": "auto", "messages": [{"role": "root", "content": "x"}]}),
                     400, "'messages.0.role'"),
    "top-level-array": (b"[]", 400, "must be a JSON object"),
    "empty-body": (b"", 400, "could not parse"),
    "over-the-size-limit": (body(chat("x" * (MAX_BODY + 1))), 413, "exceeds the limit"),
    "model-with-nul": (body({"model": "auto\u0000", "messages": [{"role": "user",
                                                                 "content": "x"}]}),
                       404, "does not exist"),
    "model-as-url": (body({"model": "http://127.0.0.1:1/v1", "messages": [
        {"role": "user", "content": "x"}]}), 404, "does not exist"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_bodies_get_a_clear_4xx_and_are_not_cached(hostile: Hostile, case: str) -> None:
    content, status, says = REFUSED[case]
    response = hostile.post(content)
    assert response.status_code == status, response.text[:300]
    assert_openai_error(response)
    assert says in response.json()["error"]["message"]
    assert hostile.cached() == []  # these run first, on an empty prefix


def test_a_failed_answer_is_not_cached(hostile: Hostile) -> None:
    """Every model failing is a 502, and stores nothing: the same request, once the upstream
    recovers, is answered afresh (and only then cached)."""
    key = f"fail-{uuid.uuid4().hex[:8]}"
    failing = body(chat("broken" + script(status=500, fail_times=10, key=key)))
    statuses = []
    while not statuses or statuses[-1] == 502:
        statuses.append(hostile.post(failing).status_code)
        assert len(statuses) <= 10, statuses
        if statuses[-1] == 502:
            assert hostile.cached() == []
    assert statuses[0] == 502 and statuses[-1] == 200, statuses
    assert hostile.cached() != []
    assert hostile.post(failing).headers["x-smallfirst-route"] == "cache_exact"


VALID: dict[str, bytes] = {
    "nul-bytes": body(chat("a\u0000b\u0000c")),
    "surrogate-pair": HEAD.replace(b'"hi"', b'"smile \\ud83d\\ude00"') + b"}",
    "unknown-fields": body(chat("hi", zzz={"deep": [1, 2]}, logit_bias_v2=3)),
    "huge-max-tokens": body(chat("hi", max_tokens=10**30)),
    "huge-seed": body(chat("hi", seed=10**30)),
    "five-thousand-messages": body({"model": "auto", "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
        for i in range(5001)]}),
    "three-thousand-tools": body(chat("hi", tools=[
        {"type": "function", "function": {"name": f"tool_{i}", "parameters": {
            "type": "object", "properties": {"x": {"type": "string"}}}}}
        for i in range(3000)])),
    "one-megabyte-message": body(chat("word " * 200_000)),
    "nested-within-the-limit": HEAD + b',"x":' + b"[" * 40 + b"]" * 40 + b"}",
}


@pytest.mark.parametrize("case", list(VALID))
def test_odd_but_valid_bodies_get_a_normal_answer(hostile: Hostile, case: str) -> None:
    response = hostile.post(VALID[case], **{"cache-control": "no-store"})
    # The upstream stands in for a real model, which may refuse what it cannot take
    # (a context too long, max_tokens past it): then a 400, never a 5xx.
    assert response.status_code in (200, 400), response.text[:300]
    assert_openai_error(response)
    if response.status_code == 200:
        assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_memory_stays_bounded_under_endless_bodies(hostile: Hostile) -> None:
    """A chunked body with no length is cut at the limit: 64 MiB offered, at most the limit
    read, and the process does not grow by the body's size."""
    before, entries = hostile.rss_mb(), hostile.cached()
    for _ in range(3):
        sent, reply = stream_endless_body(hostile.base, total=64 * 1024 * 1024)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b'"request_too_large"' in reply
        assert sent < 64 * 1024 * 1024
    for _ in range(5):  # and whole bodies just under the limit, parsed and refused
        assert hostile.post(body(chat("x" * (MAX_BODY - 200), temperature=9))).status_code == 400
    assert hostile.rss_mb() - before < 64, (before, hostile.rss_mb())
    assert hostile.cached() == entries


def stream_endless_body(base: str, total: int) -> tuple[int, bytes]:
    """POST a chunked body of up to `total` bytes; stop when the server answers."""
    host, port = base.removeprefix("http://").split(":")
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server stopped reading and closed
                break
            sent += len(chunk)
        reply = b""
        while not reply.endswith(b"}}"):  # the headers, then the JSON error body
            more = sock.recv(65536)
            if not more:
                break
            reply += more
        return sent, reply
