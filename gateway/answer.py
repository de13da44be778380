"""A model's answer as it arrives in stream chunks, and the usage a request adds up.

`Assembly` keeps the chunks for replay, the text, tool calls, token logprobs, usage and the
model call's span; it yields what the scorers judge (`Answer`) and what the cache stores
(`CachedAnswer`).
"""

from __future__ import annotations

import re
import time
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span

from gateway.cache.base import CachedAnswer
from gateway.scoring import Answer
from gateway.telemetry import genai


class Usage:
    """Token usage summed over every model attempt of one request, and per model."""

    def __init__(self) -> None:
        self.prompt = self.completion = 0
        self.by_model: dict[str, dict[str, int]] = {}

    def add(self, usage: dict[str, Any] | None, model: str) -> None:
        if not usage:
            return
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        self.prompt += prompt
        self.completion += completion
        spent = self.by_model.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0})
        spent["prompt_tokens"] += prompt
        spent["completion_tokens"] += completion

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


class Assembly:
    """An answer assembled from stream chunks, kept for replay and for the cache."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.content_chunks = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.span: Span = INVALID_SPAN  # the model call's span, ended with the stream

    def absorb(self, chunk: dict[str, Any]) -> None:
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if not chunk.get("choices"):
            return  # a usage-only chunk: never replayed
        self.chunks.append(chunk)
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
                self.content_chunks += 1
            for call in delta.get("tool_calls") or []:
                self._merge_tool_call(call)
            self.logprobs.extend((choice.get("logprobs") or {}).get("content") or [])
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if self.first_token_at is None and (self.content_chunks or self.tool_calls):
            self.first_token_at = time.monotonic()

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000

    def finish_span(self, content: bool) -> None:
        """Record the answer on the model call's span and end it."""
        genai.record_response(
            self.span, model=self.model, response_id=None, finish_reason=self.finish_reason,
            usage=self.usage, ttft_ms=self.ttft_ms,
            content="".join(self.text) if content else None,
        )
        self.span.end()

    def _merge_tool_call(self, delta: dict[str, Any]) -> None:
        call = self.tool_calls.setdefault(
            delta.get("index", 0), {"id": None, "type": "function",
                                    "function": {"name": "", "arguments": ""}}
        )
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    @property
    def tokens(self) -> int:
        return len(self.logprobs) or self.content_chunks

    def answer(self) -> Answer:
        return Answer(
            text="".join(self.text),
            token_logprobs=[e["logprob"] for e in self.logprobs if "logprob" in e],
            complete=self.finish_reason is not None,
            top_logprobs=[[t["logprob"] for t in e.get("top_logprobs") or []]
                          for e in self.logprobs] or None,
        )

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.tool_calls:
            message["tool_calls"] = self.ordered_tool_calls()
        return message

    def ordered_tool_calls(self) -> list[dict[str, Any]]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)]

    def cached(self, model: str) -> CachedAnswer | None:
        """The answer to store, or None when it is incomplete or cut short."""
        if self.finish_reason not in STORABLE_FINISH:
            return None
        return CachedAnswer(model=self.model or model, pieces=list(self.text),
                            finish_reason=self.finish_reason,
                            tool_calls=self.ordered_tool_calls(), usage=self.usage or {},
                            created=int(time.time()))


STORABLE_FINISH = ("stop", "tool_calls")
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
