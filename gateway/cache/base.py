"""What the engine needs from a response cache, and the stored answer it replays.

An answer is stored once, complete (content pieces as they were streamed, tool calls, finish
reason, usage, model), and replayed either as a `chat.completion` or as a chunk stream whose
pieces match the original's, so a cached stream equals the original to the byte in content.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

CacheKind = Literal["exact", "semantic"]


@dataclass(frozen=True)
class CachedAnswer:
    model: str
    pieces: list[str]  # content, split where the original stream split it
    finish_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)  # what the original cost, for reports
    created: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CachedAnswer:
        return cls(**data)

    @property
    def content(self) -> str | None:
        return "".join(self.pieces) or None

    def response(self, completion_id: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self.finish_reason}],
            "usage": ZERO_USAGE,
        }

    def chunks(self, completion_id: str) -> list[dict[str, Any]]:
        """The stream replay: a role chunk, one chunk per piece, tool calls, the finish."""
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": piece}) for piece in self.pieces]
        for index, call in enumerate(self.tool_calls):
            out.append(chunk({"tool_calls": [{"index": index, **call}]}))
        out.append(chunk({}, self.finish_reason))
        return out


ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@dataclass(frozen=True)
class CacheHit:
    kind: CacheKind
    answer: CachedAnswer
    similarity: float | None = None  # semantic hits: the verified candidate's score


@dataclass(frozen=True)
class CacheRequest:
    """Everything about a request that a cache may key on or must filter by."""

    tenant: str
    policy: str
    model: str  # the resolved target: a policy name or a direct backend name
    params: dict[str, Any]  # messages, tools, sampling parameters: the whole answer-changing set
    embedding: Any | None = None  # the request's shared prompt embedding, when computed


class ResponseCache(Protocol):
    async def lookup(self, request: CacheRequest) -> CacheHit | None:
        """A hit to serve, or None. Must never raise: a broken cache is a miss."""
        ...

    async def store(self, request: CacheRequest, answer: CachedAnswer) -> None:
        """Remember a complete answer. Must never raise: a broken cache skips the write."""
        ...
