"""Server-sent events in OpenAI's streaming format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str, error_type: str = "upstream_error", code: str | None = None) -> bytes:
    """An in-band error: OpenAI clients raise on it instead of reporting a truncated success."""
    return event({"error": {"message": message, "type": error_type, "param": None, "code": code}})


class EventStream(StreamingResponse):
    """A streamed answer whose generator is closed however sending ends (a finished stream,
    a client gone, a client that stopped reading), so the upstream call behind it is closed
    now, not whenever the collector finds the generator."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]
