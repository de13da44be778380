"""Server-sent events in OpenAI's streaming format."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str, error_type: str = "upstream_error", code: str | None = None) -> bytes:
    """An in-band error: OpenAI clients raise on it instead of reporting a truncated success."""
    return event({"error": {"message": message, "type": error_type, "param": None, "code": code}})
