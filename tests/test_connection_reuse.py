"""The small-model hop reuses its connections: a stream read to [DONE] gives its connection
back to the pool instead of leaving it unread (which costs a new TCP connection per request)."""

from __future__ import annotations

import asyncio
import json

from gateway.backends import OpenAIWireBackend
from gateway.config import BackendConfig

CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}


async def sse_server() -> tuple[asyncio.Server, list[int]]:
    """An OpenAI-style streaming server (chunked SSE, keep-alive) that counts connections."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for event in (f"data: {json.dumps(CHUNK)}\n\n", "data: [DONE]\n\n"):
                data = event.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, accepted


async def test_streams_read_to_done_reuse_one_connection() -> None:
    server, accepted = await sse_server()
    port = server.sockets[0].getsockname()[1]
    backend = OpenAIWireBackend(BackendConfig(model="hosted_vllm/m",
                                              api_base=f"http://127.0.0.1:{port}/v1"))
    try:
        for _ in range(5):
            chunks = await backend.stream({"messages": [{"role": "user", "content": "hi"}]},
                                          timeout=5)
            assert [c["choices"][0]["delta"]["content"] async for c in chunks] == ["hi"]
        assert len(accepted) == 1
    finally:
        await backend.aclose()
        server.close()
