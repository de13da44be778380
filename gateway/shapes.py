"""OpenAI response and chunk shapes, in one place: a cached answer replayed as a
`chat.completion` or a chunk stream, a complete response turned into the answer the cache keeps,
and chat shapes as legacy `text_completion` ones.
"""

from __future__ import annotations

import re
import time
from typing import Any

from gateway.types import STORABLE_FINISH, ZERO_USAGE, CachedAnswer


def replay_response(answer: CachedAnswer, completion_id: str) -> dict[str, Any]:
    """A cached answer as a `chat.completion` (it cost nothing this time)."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": answer.finish_reason}],
        "usage": ZERO_USAGE,
    }


def replay_chunks(answer: CachedAnswer, completion_id: str) -> list[dict[str, Any]]:
    """The stream replay: a role chunk, one chunk per piece, tool calls, the finish."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": answer.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": piece}) for piece in answer.pieces]
    for index, call in enumerate(answer.tool_calls):
        out.append(chunk({"tool_calls": [{"index": index, **call}]}))
    out.append(chunk({}, answer.finish_reason))
    return out


_PIECES = re.compile(r"\s*\S+|\s+")


def cached_from_response(response: dict[str, Any]) -> CachedAnswer | None:
    """The answer to store from a complete non-streamed response, or None."""
    choice = response["choices"][0]
    if choice.get("finish_reason") not in STORABLE_FINISH:
        return None
    message = choice.get("message") or {}
    return CachedAnswer(
        model=response.get("model", ""),
        pieces=_PIECES.findall(message.get("content") or ""),
        finish_reason=choice["finish_reason"],
        tool_calls=message.get("tool_calls") or [],
        usage=response.get("usage") or {},
        created=int(time.time()),
    )


def as_text_completion(response: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {"index": c.get("index", 0), "text": (c.get("message") or {}).get("content") or "",
         "logprobs": None, "finish_reason": c.get("finish_reason")}
        for c in response.get("choices", [])
    ]
    return {**response, "id": response["id"].replace("chatcmpl-", "cmpl-", 1),
            "object": "text_completion", "choices": choices}


def as_text_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    choices = [
        {"index": c.get("index", 0), "text": (c.get("delta") or {}).get("content") or "",
         "logprobs": None, "finish_reason": c.get("finish_reason")}
        for c in chunk.get("choices", [])
    ]
    return {**chunk, "id": chunk["id"].replace("chatcmpl-", "cmpl-", 1),
            "object": "text_completion", "created": chunk.get("created", int(time.time())),
            "choices": choices}
