"""Scripted upstream: a stand-in for a real LLM provider, used only by tests and benchmarks.

This is NOT a model and NOT a real provider. It is a small OpenAI-compatible (and Anthropic
Messages-compatible) HTTP server whose every answer, delay and fault is chosen per request by a
script, so tests and benchmarks can play the frontier model (and sometimes the small model) without
a paid API: slow first tokens, slow streams, stalls, 429s with Retry-After, N failures then
success, connections cut mid-stream, tool calls and logprobs. Unscripted, it answers a
request whose ``tool_choice`` names a tool (or is ``required``) with a call to that tool, and a
JSON-mode request (``response_format``) with a JSON object, as a real provider would.

Run it as its own process::

    python -m load.upstream --host 127.0.0.1 --port 9100 [--model-name NAME] [--stand-in-note]
        [--script JSON]

or in-process with ``create_app()``. Endpoints: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/messages`` (Anthropic wire format), ``GET /v1/models``,
``GET /health``, ``GET /stats`` (attempts, streams cut short by the client, and the last
``traceparent`` header received, per script key) and ``POST /stats/reset[?key=K]``.

The script is a JSON object from the ``x-upstream-script`` request header or, since a gateway
forwards only the body, from a directive ``<<script {...}>>`` anywhere in the last user message.
The header, when present, replaces the directive. Fields are those of ``Script`` below; those
a request leaves out come from the server's ``--script`` (none by default).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

SCRIPT_HEADER = "x-upstream-script"
ATTEMPT_HEADER = "x-upstream-attempt"
DIRECTIVE = "<<script"
DEFAULT_MODEL_NAME = "upstream-model"
DEFAULT_KEY = "default"
STAND_IN_NOTE = "[stand-in frontier, not a real model] "
TOOL_ARGUMENT_PIECE_CHARS = 8

JSON = dict[str, Any]


class BadRequest(Exception):
    """The request (or its script) is malformed: answered with a 400."""


class StreamCut(Exception):
    """Raised on purpose mid-response so the server drops the connection (a broken stream)."""


# --------------------------------------------------------------------------------------------
# The script


_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "ttft_ms": _NUMBER,
    "tokens_per_s": _NUMBER,
    "output_tokens": (int,),
    "text": (str,),
    "finish_reason": (str,),
    "logprob": _NUMBER,
    "min_logprob": _NUMBER,
    "status": (int,),
    "retry_after": (int, float, str),
    "fail_times": (int,),
    "key": (str,),
    "stall_before_ms": _NUMBER,
    "stall_after_tokens": (int,),
    "stall_ms": _NUMBER,
    "cut_after_tokens": (int,),
    "tool_call": (bool, dict),
    "model": (str,),
}
_NON_NEGATIVE = frozenset(
    "ttft_ms tokens_per_s output_tokens fail_times stall_before_ms stall_after_tokens stall_ms"
    " cut_after_tokens".split()
)


@dataclass(frozen=True)
class Script:
    """How one request is answered. Every field is optional; the defaults answer fast and well."""

    ttft_ms: float = 0.0  # delay before the first token (or before a non-streamed body)
    tokens_per_s: float = 0.0  # pace of tokens after the first; 0 means no delay
    output_tokens: int = 16  # length of the default answer
    text: str | None = None  # exact answer, split into word-ish pieces; wins over output_tokens
    finish_reason: str | None = None  # default: stop, length (max_tokens hit) or tool_calls
    logprob: float = -0.05  # logprob of every token ...
    min_logprob: float | None = None  # ... except the middle one, which gets this
    status: int | None = None  # HTTP error status to answer with (after stall_before_ms only)
    retry_after: float | str | None = None  # Retry-After header on errors
    fail_times: int | None = None  # fail only the first N attempts with this key, then succeed
    key: str = DEFAULT_KEY  # names the attempt counter and /stats entry; keyless ones share one
    stall_before_ms: float = 0.0  # delay before the response headers
    stall_after_tokens: int | None = None  # pause once after this many tokens ...
    stall_ms: float = 0.0  # ... for this long
    cut_after_tokens: int | None = None  # drop the connection after this many tokens
    tool_call: bool | JSON = False  # true or {"name"?, "arguments"?}: call a requested tool
    model: str | None = None  # model name to report; default the requested one

    @classmethod
    def from_mapping(cls, raw: object) -> Script:
        if not isinstance(raw, dict):
            raise BadRequest("upstream script must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BadRequest(f"unknown upstream script fields: {', '.join(unknown)}")
        values = {name: value for name, value in raw.items() if value is not None}
        for name, value in values.items():
            _check_field(name, value)
        return cls(**values)

    def failure_status(self, attempt: int) -> int | None:
        """The error status for this attempt (1-based) of the script's key, or None to succeed."""
        if self.fail_times is not None:
            return (self.status or 500) if attempt <= self.fail_times else None
        if self.status is not None and self.status >= 400:
            return self.status
        return None


def _check_field(name: str, value: object) -> None:
    types = _FIELD_TYPES[name]
    # bool is an int subclass; a stray true must not pass as a number.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadRequest(f"upstream script field {name!r} has the wrong type")
    if name in _NON_NEGATIVE and value < 0:  # type: ignore[operator]
        raise BadRequest(f"upstream script field {name!r} must be >= 0")
    if name in ("logprob", "min_logprob") and value > 0:  # type: ignore[operator]
        raise BadRequest(f"upstream script field {name!r} must be <= 0")
    if name == "status" and not 100 <= value <= 599:  # type: ignore[operator]
        raise BadRequest("upstream script field 'status' must be an HTTP status")
    if name == "tool_call" and isinstance(value, dict):
        _check_tool_call(value)


def _check_tool_call(spec: JSON) -> None:
    # Anthropic sends arguments as a parsed object, so they must be a JSON object either way.
    arguments = spec.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict) or not isinstance(spec.get("name", ""), str):
        raise BadRequest("tool_call must be true or {name?: str, arguments?: JSON object}")


def read_script(header: str | None, last_user_text: str, defaults: JSON | None = None) -> Script:
    """The header's script if there is one, else the directive in the last user message; the
    fields either leaves out are taken from `defaults` (the server's --script)."""
    if header:
        try:
            raw = json.loads(header)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{SCRIPT_HEADER} is not JSON: {exc}") from exc
    else:
        raw = _directive(last_user_text)
    if defaults and isinstance(raw, dict):
        raw = {**defaults, **raw}
    return Script.from_mapping(raw)


def _directive(text: str) -> object:
    start = text.find(DIRECTIVE)
    if start < 0:
        return {}
    # raw_decode reads exactly one JSON value, so braces and '>>' inside strings are safe.
    at = start + len(DIRECTIVE)
    while at < len(text) and text[at].isspace():
        at += 1
    try:
        value, _ = json.JSONDecoder().raw_decode(text, at)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"bad {DIRECTIVE} directive: {exc}") from exc
    return value


# --------------------------------------------------------------------------------------------
# What is asked, and what is answered (wire-format neutral)


@dataclass(frozen=True)
class Call:
    """What a request asks for, whatever its wire format."""

    model: str
    prompt_text: str  # all message text: counts prompt tokens, seeds the default answer
    last_user_text: str  # where a script directive is looked for
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats
    max_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    tool_names: tuple[str, ...] = ()
    n: int = 1  # choices in a non-streamed answer (all alike: the answer is scripted)
    forced_tool: str | None = None  # tool_choice named a function (or said "required")
    json_mode: bool = False  # response_format asked for JSON


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class Reply:
    """The planned answer: pieces are text tokens, or argument pieces for a tool call."""

    model: str
    pieces: tuple[str, ...]
    logprobs: tuple[float, ...]
    finish_reason: str  # OpenAI's vocabulary; Anthropic maps it
    prompt_tokens: int
    tool: ToolCall | None = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def text(self) -> str:
        return "" if self.tool else "".join(self.pieces)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Character offset of each piece (legacy logprobs' text_offset)."""
        return (0, *itertools.accumulate(len(p) for p in self.pieces))[: len(self.pieces)]

    def usage(self, done: int | None = None) -> JSON:
        """Usage after `done` pieces (all of them by default)."""
        done = len(self.pieces) if done is None else done
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }


_PIECE = re.compile(r"\s*\S+|\s+")
_WORDS = tuple(
    "amber basalt cedar delta ember fjord garnet harbor iris juniper kelp lagoon meadow nickel"
    " onyx prairie quartz river summit tundra umber valley willow xenon yarrow zephyr".split()
)


def split_text(text: str) -> tuple[str, ...]:
    """Word-ish tokens that join back to exactly the text."""
    return tuple(_PIECE.findall(text))


def default_answer(prompt_text: str, n: int) -> tuple[str, ...]:
    """A deterministic answer of n pieces derived from the prompt (same prompt, same answer)."""
    if n <= 0:
        return ()
    seed = int.from_bytes(hashlib.sha256(prompt_text.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return ("Answer:", *(" " + rng.choice(_WORDS) for _ in range(n - 1)))


def plan_reply(script: Script, call: Call, note: str = "") -> Reply:
    """The answer to `call`; `note` (if any) opens every default answer (not scripted text)."""
    model = script.model or call.model
    prompt_tokens = len(call.prompt_text.split())
    if (script.tool_call or call.forced_tool) and call.tool_names:
        tool = _tool_call(script.tool_call or {"name": call.forced_tool},
                          call.forced_tool or call.tool_names[0])
        pieces = _argument_pieces(tool.arguments)
        finish = script.finish_reason or "tool_calls"
        return Reply(model, pieces, (script.logprob,) * len(pieces), finish, prompt_tokens, tool)
    pieces = (
        split_text(script.text)
        if script.text is not None
        else (*split_text(note), *default_answer(call.prompt_text, script.output_tokens))
    )
    if call.json_mode and script.text is None:  # a JSON-mode client gets a JSON object
        pieces = split_text(json.dumps({"answer": "".join(pieces).strip()}))
    finish = "stop"
    if call.max_tokens is not None and len(pieces) > call.max_tokens:
        pieces, finish = pieces[: call.max_tokens], "length"
    logprobs = _token_logprobs(script, len(pieces))
    return Reply(model, pieces, logprobs, script.finish_reason or finish, prompt_tokens)


def _tool_call(spec: bool | JSON, first_tool: str) -> ToolCall:
    spec = spec if isinstance(spec, dict) else {}
    arguments = spec.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall("call_" + uuid.uuid4().hex[:24], str(spec.get("name", first_tool)), text)


def _argument_pieces(arguments: str) -> tuple[str, ...]:
    size = TOOL_ARGUMENT_PIECE_CHARS
    return tuple(arguments[i : i + size] for i in range(0, len(arguments), size)) or ("",)


def _token_logprobs(script: Script, n: int) -> tuple[float, ...]:
    values = [float(script.logprob)] * n
    if script.min_logprob is not None and n:
        values[n // 2] = float(script.min_logprob)
    return tuple(values)


def top_logprobs(token: str, logprob: float, count: int) -> list[JSON]:
    """The chosen token plus count-1 made-up alternatives sharing the remaining probability."""
    if count <= 0:
        return []
    rest = max(1.0 - math.exp(logprob), 1e-12)
    candidates = [(token, logprob)]
    candidates += [(f" alt{i}", math.log(rest / 2 ** (i + 1))) for i in range(count - 1)]
    candidates.sort(key=lambda c: c[1], reverse=True)
    return [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in candidates]


def logprob_entry(token: str, logprob: float, count: int) -> JSON:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": top_logprobs(token, logprob, count),
    }


# --------------------------------------------------------------------------------------------
# Timing: every wire format paces its tokens through here


async def sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def paced(script: Script, pieces: tuple[str, ...]) -> AsyncIterator[tuple[int, str]]:
    """Yield pieces at the script's pace; stall or cut where it says (clamped to the length)."""
    gap = 1.0 / script.tokens_per_s if script.tokens_per_s > 0 else 0.0
    for index, piece in enumerate(pieces):
        await _before_piece(script, index, len(pieces), gap if index else 0.0)
        yield index, piece
    await _before_piece(script, len(pieces), len(pieces), 0.0)


async def _before_piece(script: Script, emitted: int, total: int, gap: float) -> None:
    if script.cut_after_tokens is not None and emitted == min(script.cut_after_tokens, total):
        raise StreamCut(f"scripted cut after {emitted} tokens")
    if script.stall_after_tokens is not None and emitted == min(script.stall_after_tokens, total):
        await sleep_ms(script.stall_ms)
    if gap:
        await asyncio.sleep(gap)


def sse(payload: JSON | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


class TruncatedResponse(Response):
    """Promises the whole body (Content-Length), sends half, then drops the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise StreamCut("scripted cut of a non-streamed response")


# --------------------------------------------------------------------------------------------
# Shared request parsing helpers


def _content_text(content: object) -> str:
    """Text of an OpenAI or Anthropic message content: a string or a list of parts/blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "tool_result":
            texts.append(_content_text(part.get("content")))
    return "\n".join(texts)


def _messages(body: JSON) -> list[JSON]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest("every message must be an object")
    return messages


def _last_user_text(messages: list[JSON]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _int_or_none(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"'{name}' must be a non-negative integer")
    return value


def _model(body: JSON, default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


# --------------------------------------------------------------------------------------------
# OpenAI chat completions


def _error_type(status: int) -> str:
    kinds = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }
    return kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error(status: int, message: str, headers: dict[str, str]) -> Response:
    code = "rate_limit_exceeded" if status == 429 else None
    error = {"message": message, "type": _error_type(status), "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def parse_chat(body: JSON, default_model: str) -> Call:
    messages = _messages(body)
    tools = body.get("tools") if body.get("tool_choice") != "none" else None
    names = tuple(
        t["function"]["name"]
        for t in tools or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
    )
    stream_options = body.get("stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Call(
        model=_model(body, default_model),
        prompt_text="\n".join(_content_text(m.get("content")) for m in messages),
        last_user_text=_last_user_text(messages),
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict)
        and bool(stream_options.get("include_usage")),
        continuous_usage=isinstance(stream_options, dict)
        and bool(stream_options.get("continuous_usage_stats")),
        max_tokens=_int_or_none(max_tokens, "max_tokens"),
        logprobs=bool(body.get("logprobs")),
        top_logprobs=_int_or_none(body.get("top_logprobs"), "top_logprobs") or 0,
        tool_names=names,
        n=max(1, _int_or_none(body.get("n"), "n") or 1),
        forced_tool=_forced_tool(body.get("tool_choice"), names),
        json_mode=_json_mode(body.get("response_format")),
    )


def _json_mode(response_format: object) -> bool:
    return isinstance(response_format, dict) and response_format.get("type") in (
        "json_object", "json_schema")


def _forced_tool(choice: object, names: tuple[str, ...]) -> str | None:
    """The tool a chat request's tool_choice insists on, if it insists."""
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name") or "") or None
    return names[0] if choice == "required" and names else None


def _chat_logprobs(call: Call, reply: Reply, start: int, stop: int) -> JSON | None:
    if not call.logprobs or reply.tool:
        return None
    pairs = zip(reply.pieces[start:stop], reply.logprobs[start:stop], strict=True)
    return {"content": [logprob_entry(t, lp, call.top_logprobs) for t, lp in pairs]}


def _tool_json(tool: ToolCall) -> JSON:
    return {
        "id": tool.id,
        "type": "function",
        "function": {"name": tool.name, "arguments": tool.arguments},
    }


def chat_body(call: Call, reply: Reply) -> JSON:
    message: JSON = {"role": "assistant", "content": reply.text}
    if reply.tool:
        message.update(content=None, tool_calls=[_tool_json(reply.tool)])
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _chat_logprobs(call, reply, 0, len(reply.pieces)),
        "finish_reason": reply.finish_reason,
    }
    return {
        "id": "chatcmpl-" + reply.uid,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [{**choice, "index": i} for i in range(call.n)],
        "usage": {**reply.usage(), "completion_tokens": call.n * len(reply.pieces),
                  "total_tokens": reply.prompt_tokens + call.n * len(reply.pieces)},
    }


def _chat_chunk(reply: Reply, choices: list[JSON], **extra: Any) -> JSON:
    return {
        "id": "chatcmpl-" + reply.uid,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        **extra,
    }


def _chat_delta(
    reply: Reply, delta: JSON, logprobs: JSON | None = None, finish: str | None = None
) -> JSON:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _chat_chunk(reply, [choice])


def _chat_first_delta(reply: Reply) -> JSON:
    if reply.tool is None:
        return {"role": "assistant", "content": ""}
    head = {**_tool_json(reply.tool), "index": 0}
    head["function"] = {"name": reply.tool.name, "arguments": ""}
    return {"role": "assistant", "content": None, "tool_calls": [head]}


def _chat_piece_delta(reply: Reply, piece: str) -> JSON:
    if reply.tool is None:
        return {"content": piece}
    return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


async def chat_events(script: Script, call: Call, reply: Reply) -> AsyncIterator[bytes]:
    await sleep_ms(script.ttft_ms)
    yield sse(_chat_delta(reply, _chat_first_delta(reply)))
    async for index, piece in paced(script, reply.pieces):
        logprobs = _chat_logprobs(call, reply, index, index + 1)
        chunk = _chat_delta(reply, _chat_piece_delta(reply, piece), logprobs)
        if call.continuous_usage:
            chunk["usage"] = reply.usage(index + 1)
        yield sse(chunk)
    yield sse(_chat_delta(reply, {}, finish=reply.finish_reason))
    if call.include_usage:
        yield sse(_chat_chunk(reply, [], usage=reply.usage()))
    yield sse("[DONE]")


# --------------------------------------------------------------------------------------------
# OpenAI legacy completions


def parse_completion(body: JSON, default_model: str) -> Call:
    prompt = body.get("prompt", "")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    texts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
    stream_options = body.get("stream_options")
    logprobs = _int_or_none(body.get("logprobs"), "logprobs")
    return Call(
        model=_model(body, default_model),
        prompt_text="\n".join(texts),
        last_user_text=texts[-1] if texts else "",
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict)
        and bool(stream_options.get("include_usage")),
        max_tokens=_int_or_none(body.get("max_tokens"), "max_tokens"),
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )


def _legacy_logprobs(call: Call, reply: Reply, start: int, stop: int) -> JSON | None:
    if not call.logprobs:
        return None
    tokens = list(reply.pieces[start:stop])
    values = list(reply.logprobs[start:stop])
    offsets = list(reply.offsets[start:stop])
    tops = [
        {e["token"]: e["logprob"] for e in top_logprobs(t, lp, call.top_logprobs)}
        for t, lp in zip(tokens, values, strict=True)
    ]
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _completion_object(reply: Reply, choices: list[JSON], **extra: Any) -> JSON:
    return {
        "id": "cmpl-" + reply.uid,
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        **extra,
    }


def _completion_choice(text: str, logprobs: JSON | None, finish: str | None) -> JSON:
    return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}


def completion_body(call: Call, reply: Reply) -> JSON:
    logprobs = _legacy_logprobs(call, reply, 0, len(reply.pieces))
    choice = _completion_choice(reply.text, logprobs, reply.finish_reason)
    return _completion_object(reply, [choice], usage=reply.usage())


async def completion_events(script: Script, call: Call, reply: Reply) -> AsyncIterator[bytes]:
    await sleep_ms(script.ttft_ms)
    async for index, piece in paced(script, reply.pieces):
        logprobs = _legacy_logprobs(call, reply, index, index + 1)
        yield sse(_completion_object(reply, [_completion_choice(piece, logprobs, None)]))
    yield sse(_completion_object(reply, [_completion_choice("", None, reply.finish_reason)]))
    if call.include_usage:
        yield sse(_completion_object(reply, [], usage=reply.usage()))
    yield sse("[DONE]")


# --------------------------------------------------------------------------------------------
# Anthropic Messages (the second provider wire format)

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(status: int, message: str, headers: dict[str, str]) -> Response:
    kind = _ANTHROPIC_ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_messages(body: JSON, default_model: str) -> Call:
    messages = _messages(body)
    choice = body.get("tool_choice")
    no_tools = isinstance(choice, dict) and choice.get("type") == "none"
    tools = [] if no_tools else body.get("tools") or []
    names = tuple(
        t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)
    )
    texts = [_content_text(body.get("system"))] + [
        _content_text(m.get("content")) for m in messages
    ]
    return Call(
        model=_model(body, default_model),
        prompt_text="\n".join(t for t in texts if t),
        last_user_text=_last_user_text(messages),
        stream=bool(body.get("stream")),
        max_tokens=_int_or_none(body.get("max_tokens"), "max_tokens"),
        tool_names=names,
    )


def _anthropic_usage(reply: Reply, output_tokens: int) -> JSON:
    return {
        "input_tokens": reply.prompt_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _stop_reason(reply: Reply) -> str:
    return _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)


def _content_block(reply: Reply, complete: bool) -> JSON:
    """The block as sent whole (complete) or as opened by content_block_start (empty)."""
    if reply.tool is None:
        return {"type": "text", "text": reply.text if complete else ""}
    tool_input = json.loads(reply.tool.arguments or "{}") if complete else {}
    return {
        "type": "tool_use",
        "id": "toolu_" + reply.tool.id[5:],
        "name": reply.tool.name,
        "input": tool_input,
    }


def _message(reply: Reply, content: list[JSON], stop_reason: str | None, output: int) -> JSON:
    return {
        "id": "msg_" + reply.uid,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(reply, output),
    }


def messages_body(call: Call, reply: Reply) -> JSON:
    block = _content_block(reply, complete=True)
    return _message(reply, [block], _stop_reason(reply), len(reply.pieces))


def _anthropic_delta(reply: Reply, piece: str) -> JSON:
    if reply.tool is None:
        delta = {"type": "text_delta", "text": piece}
    else:
        delta = {"type": "input_json_delta", "partial_json": piece}
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def _message_start(reply: Reply) -> JSON:
    # Anthropic opens with an empty message; stop reason and output count come in message_delta.
    return {"type": "message_start", "message": _message(reply, [], None, 1)}


async def messages_events(script: Script, call: Call, reply: Reply) -> AsyncIterator[bytes]:
    await sleep_ms(script.ttft_ms)
    yield sse(_message_start(reply), "message_start")
    block = {"type": "content_block_start", "index": 0}
    yield sse({**block, "content_block": _content_block(reply, complete=False)}, block["type"])
    yield sse({"type": "ping"}, "ping")
    async for _, piece in paced(script, reply.pieces):
        yield sse(_anthropic_delta(reply, piece), "content_block_delta")
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    delta = {"stop_reason": _stop_reason(reply), "stop_sequence": None}
    usage = {"output_tokens": len(reply.pieces)}
    yield sse({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


# --------------------------------------------------------------------------------------------
# HTTP plumbing


@dataclass(frozen=True)
class WireFormat:
    """One provider API: how to read its requests and write its answers and errors."""

    parse: Callable[[JSON, str], Call]
    body: Callable[[Call, Reply], JSON]
    events: Callable[[Script, Call, Reply], AsyncIterator[bytes]]
    error: Callable[[int, str, dict[str, str]], Response]


OPENAI_CHAT = WireFormat(parse_chat, chat_body, chat_events, openai_error)
OPENAI_COMPLETIONS = WireFormat(parse_completion, completion_body, completion_events, openai_error)
ANTHROPIC_MESSAGES = WireFormat(parse_messages, messages_body, messages_events, anthropic_error)


@dataclass
class Stats:
    """Attempts seen per script key; also the fail_times counters (so reset clears both)."""

    keys: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    cancelled: Counter[str] = field(default_factory=Counter)  # streams the client abandoned
    traceparents: dict[str, str] = field(default_factory=dict)  # the last one seen, per key

    def record(self, key: str, path: str) -> int:
        self.keys[key] += 1
        self.paths[path] += 1
        return self.keys[key]

    def snapshot(self) -> JSON:
        return {"total": self.keys.total(), "keys": dict(self.keys), "paths": dict(self.paths),
                "cancelled": dict(self.cancelled), "traceparent": dict(self.traceparents)}

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self.keys.clear()
            self.paths.clear()
            self.cancelled.clear()
            self.traceparents.clear()
        else:
            self.keys.pop(key, None)
            self.cancelled.pop(key, None)
            self.traceparents.pop(key, None)


async def _counting_cancels(
    events: AsyncIterator[bytes], stats: Stats, key: str
) -> AsyncIterator[bytes]:
    """The events, counting under `key` a stream stopped early because its client went away."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        stats.cancelled[key] += 1
        raise


async def _json_object(request: Request) -> JSON:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _retry_after(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


async def _complete(
    fmt: WireFormat, script: Script, call: Call, reply: Reply, headers: dict[str, str]
) -> Response:
    """A non-streamed answer takes as long as its stream would have, cuts included."""
    await sleep_ms(script.ttft_ms)
    content = json.dumps(fmt.body(call, reply)).encode()
    try:
        async for _ in paced(script, reply.pieces):
            pass
    except StreamCut:
        return TruncatedResponse(content, headers=headers, media_type="application/json")
    return Response(content, headers=headers, media_type="application/json")


def endpoint(fmt: WireFormat) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        state: UpstreamState = request.app.state.upstream
        try:
            call = fmt.parse(await _json_object(request), state.model_name)
            script = read_script(request.headers.get(SCRIPT_HEADER), call.last_user_text,
                                 state.defaults)
        except BadRequest as exc:
            return fmt.error(400, str(exc), {})
        attempt = state.stats.record(script.key, request.url.path)
        if "traceparent" in request.headers:  # W3C trace context a gateway passed on
            state.stats.traceparents[script.key] = request.headers["traceparent"]
        headers = {ATTEMPT_HEADER: str(attempt)}
        await sleep_ms(script.stall_before_ms)
        status = script.failure_status(attempt)
        if status is not None:
            if script.retry_after is not None:
                headers["retry-after"] = _retry_after(script.retry_after)
            message = f"scripted upstream failure: status {status}, attempt {attempt}"
            return fmt.error(status, message, headers)
        reply = plan_reply(script, call, state.stand_in_note)
        if call.stream:
            events = _counting_cancels(fmt.events(script, call, reply), state.stats, script.key)
            headers["cache-control"] = "no-cache"
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return await _complete(fmt, script, call, reply, headers)

    return handle


@dataclass
class UpstreamState:
    model_name: str
    stand_in_note: str = ""  # prefix of every default answer (see --stand-in-note)
    defaults: JSON = field(default_factory=dict)  # script fields every request starts from
    stats: Stats = field(default_factory=Stats)


async def models(request: Request) -> Response:
    name = request.app.state.upstream.model_name
    entry = {"id": name, "object": "model", "created": 0, "owned_by": "scripted-upstream"}
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> Response:
    return JSONResponse(request.app.state.upstream.stats.snapshot())


async def stats_reset(request: Request) -> Response:
    request.app.state.upstream.stats.reset(request.query_params.get("key"))
    return JSONResponse({"reset": True})


def create_app(model_name: str = DEFAULT_MODEL_NAME, stand_in_note: str = "",
               defaults: JSON | None = None) -> Starlette:
    """The scripted upstream as an ASGI app; each app keeps its own counters. A
    `stand_in_note` opens every default answer, so a reader cannot take it for a model's.
    `defaults` are script fields for every request, each overridden by the request's own
    script (e.g. one process per model, each with its own `ttft_ms`)."""
    Script.from_mapping(defaults or {})  # a bad default fails here, not on every request
    routes = [
        Route("/v1/chat/completions", endpoint(OPENAI_CHAT), methods=["POST"]),
        Route("/v1/completions", endpoint(OPENAI_COMPLETIONS), methods=["POST"]),
        Route("/v1/messages", endpoint(ANTHROPIC_MESSAGES), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/stats/reset", stats_reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.upstream = UpstreamState(model_name, stand_in_note, dict(defaults or {}))
    return app


# --------------------------------------------------------------------------------------------
# Command line


def _is_cut(exc: BaseException | None) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_cut(e) for e in exc.exceptions)
    return isinstance(exc, StreamCut)


class _HideScriptedCuts(logging.Filter):
    """A scripted cut is the point, not a bug: keep its traceback out of the server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_cut(record.exc_info[1]))


def main(argv: list[str] | None = None) -> None:
    import uvicorn  # only the command line needs a server

    parser = argparse.ArgumentParser(description="Scripted stand-in LLM upstream (tests only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--stand-in-note", nargs="?", const=STAND_IN_NOTE, default="", metavar="TEXT",
        help=f"open every default answer with TEXT (without TEXT: {STAND_IN_NOTE!r}), so "
        "nobody takes the stand-in's answers for a model's; scripted text is left as it is")
    parser.add_argument(
        "--script", type=json.loads, default={}, metavar="JSON",
        help='script fields for every request, e.g. \'{"ttft_ms": 60}\'; a request\'s own '
        "script overrides them field by field")
    args = parser.parse_args(argv)
    note = args.stand_in_note
    if note and not note.endswith((" ", "\n")):
        note += " "
    config = uvicorn.Config(
        create_app(args.model_name, note, args.script),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
    )
    logging.getLogger("uvicorn.error").addFilter(_HideScriptedCuts())
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
