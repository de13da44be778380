"""The hot path's own parts: the small-model stream reader, the gateway-kept counters and the
access log written off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from prometheus_client.parser import text_string_to_metric_families

from gateway.backends import OpenAIWireBackend
from gateway.config import BackendConfig
from gateway.telemetry import access_log
from gateway.telemetry.metrics import Metrics


def chunk(content: str) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}


async def test_stream_events_split_across_reads_are_read_whole() -> None:
    """Events cut at arbitrary bytes, CRLF line ends and one 200 KB event arrive intact."""
    long_text = "x" * 200_000
    body = "".join(f"data: {json.dumps(chunk(text))}\r\n\r\n" for text in ("a", long_text, "b"))
    body = (body + "data: [DONE]\r\n\r\n").encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 7001):  # pieces that end mid-line, mid-event
            piece = body[start:start + 7001]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = OpenAIWireBackend(BackendConfig(model="hosted_vllm/m",
                                              api_base=f"http://127.0.0.1:{port}/v1"))
    try:
        chunks = await backend.stream({"messages": [{"role": "user", "content": "hi"}]},
                                      timeout=5)
        texts = [c["choices"][0]["delta"]["content"] async for c in chunks]
    finally:
        await backend.aclose()
        server.close()
    assert texts == ["a", long_text, "b"]


def test_counters_sum_per_label_set_whatever_the_label_order() -> None:
    metrics = Metrics(env={})
    try:
        metrics.requests.add(1, {"policy": "auto", "route": "small"})
        metrics.requests.add(2, {"route": "small", "policy": "auto"})
        metrics.requests.add(1, {"policy": "auto", "route": "cache_exact"})
        metrics.in_flight.add(1)
        metrics.in_flight.add(1)
        metrics.in_flight.add(-1)
        families = {f.name: f for f in
                    text_string_to_metric_families(metrics.prometheus_text().decode())}
    finally:
        metrics.shutdown()
    requests = {s.labels["route"]: s.value for s in families["smallfirst_requests"].samples
                if s.name == "smallfirst_requests_total"}
    assert requests == {"small": 3.0, "cache_exact": 1.0}
    assert families["smallfirst_requests"].type == "counter"
    in_flight = families["smallfirst_requests_in_flight"]
    assert in_flight.type == "gauge" and [s.value for s in in_flight.samples] == [1.0]


def test_access_log_lines_are_written_by_the_writer_in_order(caplog) -> None:
    caplog.set_level(logging.INFO, logger="smallfirst.access")
    for n in range(3):
        access_log.write(request_id=f"r{n}", route="small", total_ms=1.25)

    def lines() -> list[dict]:
        return [json.loads(r.getMessage()) for r in caplog.records
                if r.name == "smallfirst.access"]

    deadline = time.monotonic() + 5
    while len(lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # the writer thread wakes every 100 ms
    written = lines()
    assert [line["request_id"] for line in written] == ["r0", "r1", "r2"]
    assert written[0]["route"] == "small" and written[0]["total_ms"] == 1.25
    assert "ts" in written[0]
