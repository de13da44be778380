"""The plain types a request is made of, below everything that handles one.

What the client asked (`Call`, `Prompt`), what a model said (`Assembly`, `Answer`, `Usage`),
what the cache keeps (`CachedAnswer`, `CacheHit`, `CacheRequest`) and how the request was
routed (`Route`, `Decision`). The engine, telemetry, the cache and the traffic learner all
speak these; this module imports none of them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from opentelemetry.trace import INVALID_SPAN, Span

from gateway.policy import Policy
from gateway.timing import Timings


class Route(StrEnum):
    SMALL = "small"
    ESCALATED = "escalated"
    FRONTIER = "frontier"
    CACHE_EXACT = "cache_exact"
    CACHE_SEMANTIC = "cache_semantic"


@dataclass
class Decision:
    """How a request was routed, and why; reported in response headers."""

    policy: str
    route: Route = Route.SMALL
    difficulty: float | None = None
    confidence: float | None = None
    escalation: str | None = None  # difficulty | low_confidence | error | deadline | unsupported
    note: str | None = None  # low_confidence_served | frontier_failed: the small answer was served
    cache: str | None = None  # exact | semantic | miss; None when the cache was not consulted


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


@dataclass(frozen=True)
class Prompt:
    """What the scorers may look at before generation."""

    messages: list[dict[str, Any]]
    has_tools: bool = False
    # The shared embedding of `text`, computing in a worker thread (only when a scorer needs it).
    embedding: asyncio.Future | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        """The final user turn: what the router was trained to judge."""
        return final_user_text(self.messages)


@dataclass(frozen=True)
class Answer:
    """The small model's (possibly partial) answer."""

    text: str
    token_logprobs: list[float] = field(default_factory=list)
    complete: bool = True
    top_logprobs: list[list[float]] | None = None
    samples: list[str] | None = None  # more answers to the same prompt (self-consistency)


def final_user_text(messages: list[dict[str, Any]]) -> str:
    """The last user message's text (the same string the semantic cache embeds, so the
    shared embedding is computed once)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content")) or ""
    return ""


def text_of(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a content list (None if other parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None  # images, audio, files: never matched by meaning
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return None


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


@dataclass
class Call:
    """One client request as the engine sees it."""

    request_id: str
    policy: Policy
    params: dict[str, Any]  # messages and sampling parameters, forwarded to models
    include_usage: bool = False
    direct: str | None = None  # a backend named directly by the client
    tenant: str = "local"
    read_cache: bool = True  # Cache-Control: no-cache turns reads off
    write_cache: bool = True  # Cache-Control: no-store turns writes off
    timings: Timings = field(default_factory=Timings)
    usage: Usage = field(default_factory=Usage)
    served_from_cache: dict[str, Any] | None = None  # a cache hit's original usage
    semantic_lookup: Any | None = None  # the cache's semantic search under way (pending)
    prompt: Prompt | None = None  # what the scorers see, built on first use
    decision: Decision | None = None
    small_answer: Assembly | None = None  # what the small model said, when it was asked
    small_rest: asyncio.Task | None = None  # a rejected prefix's answer finishing, for a label
    frontier_text: str | None = None  # what the frontier said, when it answered
    frontier_model: str | None = None
    tried_probability: float = 1.0  # its chance to try the small model (a learned skip)

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.params.get("logprobs"))

    @property
    def cacheable(self) -> bool:
        """Only deterministic-enough requests are cached (see the policy's `cache` section)."""
        settings = self.policy.cache
        if not settings.enabled:
            return False
        temperature = self.params.get("temperature")
        return not temperature or settings.temperature_above_zero

    def cache_request(self) -> CacheRequest:
        return CacheRequest(self.tenant, self.policy.name, self.direct or self.policy.name,
                            self.params)
