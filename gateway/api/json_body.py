"""Request bodies as JSON values, refused with a 400 when hostile: not JSON, not UTF-8,
numbers too long to convert, nesting deeper than any real request, lone surrogates."""

from __future__ import annotations

import json
from typing import Any

import orjson

from gateway.errors import InvalidRequest

MAX_DEPTH = 64  # tool schemas nest a few levels; nothing legitimate comes near this


def parse_json_body(raw: bytes) -> Any:
    try:
        value = orjson.loads(raw)  # the fast path; it refuses lone surrogates itself
    except orjson.JSONDecodeError:
        value = _parse_strictly(raw)  # says why, or takes what only orjson refuses (big ints)
    # Counting brackets (quoted ones too) is cheap and bounds the depth: most bodies stop here.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise _too_deep()
    return value


def _parse_strictly(raw: bytes) -> Any:
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:  # not JSON, not UTF-8, or an integer past Python's digit limit
        raise InvalidRequest("We could not parse the JSON body of your request.") from None
    if b"\\ud" in raw or b"\\uD" in raw:
        _check_surrogates(value)
    return value


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"The JSON body of your request nests deeper than {MAX_DEPTH} levels.")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in node)
    return deepest


def _check_surrogates(value: Any) -> None:
    """An escaped lone surrogate (`"\\ud800"`) decodes to a string no backend can encode."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("The JSON body of your request holds a lone surrogate "
                             "(\\ud800-\\udfff without its pair), which is not Unicode text.") \
            from None
